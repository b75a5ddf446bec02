"""``pacs export``: studies to a folder or a zip file, optionally de-identified.

Layout, in a folder or a zip: ``<study uid>/<series uid>/<sop uid>.dcm``
(de-identified exports use the new UIDs); with ``media``, a DICOM file-set
for a patient's CD or USB stick instead (DICOMDIR, README.TXT, ``DICOM/...``,
see :mod:`.media`), with the same resume, zip, full-disk and audit
behaviour. Objects are streamed from the
store as stored; a study with index corrections (HIS reconciliation) gets
them applied, as every retrieval does. With ``deidentify`` each object goes
through :mod:`pacs.deidentify` with one salt for the whole export, so UIDs
and pseudonyms are consistent across studies (and across exports with the
same salt: ``--salt``, else the appliance's own secret).

A study UID that names no study writes nothing (``missing_studies``).

Folder exports resume: files are written under a temporary name and renamed,
and a file already there is kept when it is the object (with the stored
size, for plain exports) with the index's current corrections (HIS
reconciliation since; de-identified: the pseudonym of the study's patient);
the files in a study's folder that the run neither writes nor keeps (an
earlier run's copies of objects deleted since, or withheld now) are removed.
A folder holding exported studies of the other kind (identified ones for a
de-identified export, and the reverse) is refused: they would be sent on
together (:class:`ExportConflict`).
One export at a time writes into a folder (or a zip's ``.partial``): another
one is refused while it runs (:class:`ExportConflict`).
A zip is written as ``NAME.zip.partial`` and renamed when complete. Each
exported study is audited (action "export"), also one the export stopped in
(a full disk, Ctrl-C): what was written of it has left the archive. The
studies of a zip are audited with the zip's fate: a failure when it was
removed (a full disk later) or left unfinished.

A full destination (ENOSPC, EDQUOT), or one that cannot be written (a USB
stick remounted read-only, a folder not the export's user's) stops the
export at the first object that does not fit, with one
:class:`ExportStopped`: every later object would fail the same way. A zip's ``.partial`` is removed (left, it kept the
disk full and is no use without its central directory); a folder keeps the
complete files it has (a rerun with more room resumes) and loses only the
temporary file being written.

Burned-in annotation: a de-identified export leaves out every object whose
pixels carry identifying text (Burned In Annotation = YES, see
:func:`pacs.deidentify.may_release`): they are listed in the report
(``not_exported_burned_in``) and the command exits 1, since the export is not
complete. ``include_burned_in`` (``--include-burned-in``) writes them anyway,
listed in ``burned_in_included`` (with Patient Identity Removed = NO). Objects
of classes where burned-in text is typical but not declared (secondary
captures, ultrasound without Burned In Annotation) are written and listed in
``warnings``, as are encapsulated documents (replaced by a blank one).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import select

from ..app import Pacs
from ..audit import Event
from ..backup import SALT_FILE
from ..deidentify import Deidentifier, burned_in, may_release
from ..reads import StoredInstance
from ..transcode import CodecPlan, StreamPlan, TransferSyntaxError, check_whole_size, decode_plan, stream_plan
from .common import Capped, NullProgress, Progress, instances_t, os_user, patients_t, prune_files, studies_t

log = logging.getLogger(__name__)
CHUNK = 1 << 20
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class ExportConflict(Exception):
    """The destination folder holds files this export must not join (see
    the message); nothing was written."""


class ExportStopped(Exception):
    """The export's destination (or its temporary space) is full, or cannot
    be written (read-only, not the export's user's to write): the export
    stopped, see the message for what was kept."""


def _disk_full(exc: BaseException, where: Path | None = None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind *exc* (itself or a cause), or None;
    with *where* (the folder files are written in), also an error that it
    cannot be written there: every later object would meet either."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and (current.errno in _FULL_ERRNOS
                                             or (where is not None and _unwritable(current, where))):
            return current
        current = current.__cause__ or current.__context__
    return None


def _unwritable(error: OSError, where: Path) -> bool:
    """Whether *error* says *where* cannot be written: read-only (a USB
    stick the kernel remounted so after a FAT error; a write to an open file
    names none), or permission denied on a file or folder in it."""
    named = error.filename is not None and Path(os.fsdecode(error.filename)).is_relative_to(where)
    return (error.errno == errno.EROFS and (error.filename is None or named)) or (
        error.errno in (errno.EACCES, errno.EPERM) and named)


@dataclass
class ExportReport:
    out: str
    deidentified: bool
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    kept: int = 0
    missing_studies: list[str] = field(default_factory=list)
    failed: Capped = field(default_factory=Capped)
    # De-identified exports: objects left out because their pixels carry
    # identifying text, those written anyway (include_burned_in), and
    # warnings about objects written (burned-in text likely, document blanked).
    not_exported_burned_in: Capped = field(default_factory=Capped)
    burned_in_included: Capped = field(default_factory=Capped)
    warnings: Capped = field(default_factory=Capped)
    study_map: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "deidentified": self.deidentified,
            "studies": self.studies,
            "instances": self.instances,
            "bytes": self.bytes,
            "already_there": self.kept,
            "missing_studies": self.missing_studies,
            "failed": self.failed.as_dict(),
            "not_exported_burned_in": self.not_exported_burned_in.as_dict(),
            "burned_in_included": self.burned_in_included.as_dict(),
            "warnings": self.warnings.as_dict(),
            # De-identified exports: original Study Instance UID -> the new one
            # (which study is which, for whoever sends the data on).
            "study_map": self.study_map,
        }


def deidentify_salt(pacs: Pacs) -> str:
    """The appliance's de-identification secret: ``deidentify_salt`` in the
    settings (``PACS_DEIDENTIFY_SALT``), else a random one created once in
    ``DATA_DIR/deidentify.salt`` (mode 0600; ``pacs backup`` carries it).

    Safe on first use by concurrent callers (routing threads, an export
    beside the server): the file appears whole or not at all, and every
    caller reads the one that won."""
    configured = getattr(pacs.settings, "deidentify_salt", None)
    if configured:
        return str(configured)
    return salt_file(Path(pacs.settings.data_dir) / SALT_FILE)


# How long a caller waits for an empty salt file to be filled: an older
# version created the file first and wrote it after.
_SALT_WAIT = 5.0


def salt_file(path: Path) -> str:
    """The salt in *path*, created (random) when there is none."""
    deadline = time.monotonic() + _SALT_WAIT
    while True:
        try:
            salt = path.read_text().strip()
        except FileNotFoundError:
            salt = None
        if salt:
            return salt
        if salt is None and _create_salt(path):
            continue  # ours is in place: read it back like everyone else
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} is empty: remove it (a new secret is made) or restore it from a backup")
        time.sleep(0.01)


def _create_salt(path: Path) -> bool:
    """Put a new random salt at *path* unless one is there; False when
    another caller's came first. Written to a temporary file, synced, then
    linked into place: a reader never sees a partial or empty salt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_hex(16).encode())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(name, path)
        except FileExistsError:
            return False
        with contextlib.suppress(OSError):  # the new name survives a power cut
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(name)


def _lock(fd: int, busy: str) -> None:
    """Hold an exclusive lock on *fd* (a destination folder, a zip's
    ``.partial``) until it is closed, or raise :class:`ExportConflict` with
    *busy*: another export writing there at the same time would lose the
    temporary files this one removes as an interrupted run's (or truncate
    its zip). A file system without locks is written unlocked."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ExportConflict(busy) from None
    except OSError as exc:
        log.debug("no lock on the export's destination: %s", exc)


class _Sink:
    """Where exported files go: a folder (resumable) or a zip."""

    def __init__(self, out: Path, stack: ExitStack) -> None:
        self.out = out
        self.zip: zipfile.ZipFile | None = None
        if out.suffix.lower() == ".zip":
            out.parent.mkdir(parents=True, exist_ok=True)
            self.partial = out.with_name(out.name + ".partial")
            # Identified objects: owner only, like the folder exports' files
            # (mkstemp's 0600), whatever the umask; fchmod also covers a
            # partial file an interrupted run left with another mode.
            try:
                # Not through a link: one planted there (a shared /tmp) would
                # hand the patient's images to whoever owns its target.
                fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise ExportConflict(f"{self.partial} is a symbolic link, not an interrupted export's file: "
                                     "remove it, or choose another name") from None
            self._file = stack.enter_context(os.fdopen(fd, "wb"))
            _lock(fd, f"another pacs export is writing {out}: wait for it to finish, or choose another name")
            os.ftruncate(fd, 0)  # an interrupted run's, not a running one's (locked)
            os.fchmod(fd, 0o600)
            self.zip = stack.enter_context(zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True))
            self.tmp_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pacs-export-")))
        else:
            out.mkdir(parents=True, exist_ok=True)
            self.tmp_dir = out
            fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, fd)
            _lock(fd, f"another pacs export is writing into {out}: wait for it to finish, or export into another "
                      "folder")
            for stale in out.glob(".export-*.tmp"):  # an interrupted run's (not a running one's: locked)
                stale.unlink(missing_ok=True)

    def has(self, name: str, size: int | None) -> bool:
        if self.zip is not None:
            return False
        path = self.out / name
        return path.exists() and (size is None or path.stat().st_size == size)

    def existing(self, name: str) -> Path | None:
        """The file a folder export has under *name* already (None in a zip)."""
        if self.zip is not None:
            return None
        path = self.out / name
        return path if path.is_file() else None

    def folder(self) -> Path | None:
        """The folder written to (None for a zip)."""
        return None if self.zip is not None else self.out

    def temp_file(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=".export-", suffix=".tmp", dir=self.tmp_dir)
        os.close(fd)
        return Path(name)

    def add_file(self, tmp: Path, name: str) -> None:
        """Publish a finished temporary file under *name* (moved or zipped)."""
        if self.zip is not None:
            self.zip.write(tmp, name)
            tmp.unlink()
            return
        final = self.out / name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)

    def publish(self, tmp: Path, name: str) -> Iterable[bytes]:
        """:meth:`add_file`, as the media export calls it: nothing to stream
        from a folder or a zip file (see :class:`.media.ZipStream`)."""
        self.add_file(tmp, name)
        return ()

    def add_stream(self, stream: Any, name: str, size: int) -> None:
        if self.zip is not None:
            info = zipfile.ZipInfo(name)
            info.file_size = size
            with self.zip.open(info, "w", force_zip64=size > 0x7FFFFFFF) as dest:
                shutil.copyfileobj(stream, dest, CHUNK)
            return
        tmp = self.temp_file()
        try:
            with open(tmp, "wb") as dest:
                shutil.copyfileobj(stream, dest, CHUNK)
            self.add_file(tmp, name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a half-written file only takes room
            raise

    def finish(self) -> None:
        if self.zip is not None:
            self.zip.close()
            self._file.close()  # ZipFile leaves a file it was given open
            os.replace(self.partial, self.out)

    def abort(self, full: bool = True) -> str:
        """Give up after a full disk (*full*) or one that cannot be written;
        says what is left behind.

        A zip is closed without its central directory (writing it would meet
        the full disk again) and its ``.partial`` deleted; a folder keeps its
        complete files and loses its temporary ones (as far as a read-only
        disk lets them go)."""
        if self.zip is not None:
            # ZipFile.close() would write the central directory; dropping its
            # file first makes the ExitStack's close a no-op.
            self.zip.fp = None
            with contextlib.suppress(OSError):
                self._file.close()
            try:
                self.partial.unlink(missing_ok=True)
            except OSError as exc:
                return f"{self.partial} could not be removed ({exc.strerror})"
            return f"{self.partial} removed"
        for stale in self.out.glob(".export-*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink(missing_ok=True)
        again = "with more room " if full else "once it can be written "
        return f"the complete files in {self.out} are kept: run the export again {again}to resume"


def _check_folder(out: Path, *, deidentified: bool) -> None:
    """Refuse a folder holding exported studies of the other kind
    (:class:`ExportConflict`): identified copies among a de-identified set
    go wherever the set is sent (a researcher, another institution), and
    de-identified copies among identified ones would go out with them as if
    they were. One file of each study folder tells its kind: a
    de-identified export gives every object a De-identification Method."""
    from ..header import valid_uid

    if out.suffix.lower() == ".zip" or not out.is_dir():
        return
    for study in sorted(out.iterdir()):
        if not (valid_uid(study.name) and study.is_dir()):
            continue
        first = next(study.glob("*/*.dcm"), None)
        if first is None:
            continue
        try:
            header = dcmread(first, stop_before_pixels=True, specific_tags=["DeidentificationMethod"])
        except Exception:
            continue  # not DICOM, or cut short: no kind to tell
        if ("DeidentificationMethod" in header) == deidentified:
            continue
        held = "de-identified" if not deidentified else "identified (not de-identified)"
        raise ExportConflict(
            f"{out} holds {held} exported studies (such as {study.name}): this "
            f"{'de-identified' if deidentified else 'identified'} export would be mixed with them; "
            "export into another folder")


def _study(pacs: Pacs, study_uid: str) -> Any:
    """(pk, patient_id, issuer) of a study, or None."""
    with pacs.engine.connect() as conn:
        return conn.execute(
            select(studies_t.c.pk, patients_t.c.patient_id, patients_t.c.issuer)
            .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
            .where(studies_t.c.study_uid == study_uid)
        ).first()


def study_patient(pacs: Pacs, study_uid: str) -> tuple[str, str] | None:
    """The index's (Patient ID, Issuer of Patient ID) of a study, or None:
    whom a de-identified copy's pseudonym stands for (see
    :meth:`pacs.deidentify.Deidentifier.apply`)."""
    study = _study(pacs, study_uid)
    return None if study is None else (study.patient_id or "", study.issuer or "")


def _overrides(pacs: Pacs, study_pk: int) -> tuple[tuple[str, str], ...]:
    from ..retrieve import corrected_values

    with pacs.engine.connect() as conn:
        return corrected_values(conn, {study_pk}).get(study_pk, ())


def export_studies(
    pacs: Pacs,
    study_uids: list[str],
    out: Path,
    *,
    deidentify: bool = False,
    salt: str | None = None,
    include_burned_in: bool = False,
    user: str | None = None,
    progress: Progress | None = None,
    media: bool = False,
    uncompressed: bool = False,
) -> ExportReport:
    """Write the objects of *study_uids* to the folder or ``.zip`` *out*.

    With *deidentify*, objects with burned-in annotation are left out (listed
    in the report) unless *include_burned_in*; see the module doc. With
    *media*, the layout is a DICOM file-set for CD or USB (DICOMDIR,
    ``DICOM/``, README.TXT; :mod:`.media`), its objects in Explicit VR Little
    Endian with *uncompressed*.
    """
    from .media import MediaLayout, finish_media

    progress = progress or NullProgress()
    user = user or os_user()
    out = out.absolute()  # the audit trail says where the copy went, from anywhere
    study_uids = list(dict.fromkeys(study_uids))  # a study named twice is exported once
    report = ExportReport(out=str(out), deidentified=deidentify)
    deid = Deidentifier(salt or deidentify_salt(pacs)) if deidentify else None
    layout = MediaLayout(uncompressed=uncompressed) if media else None
    # An export is written whole: one without a study the operator named (a
    # mistyped UID) is not written at all. A zip without it would refuse the
    # corrected command ("exists"); a patient's media would lack it.
    report.missing_studies = [uid for uid in study_uids if _study(pacs, uid) is None]
    if report.missing_studies:
        return report
    if layout is None:
        _check_folder(out, deidentified=deid is not None)
    else:
        layout.check_folder(out, [deid.uid_map.map(u) if deid else u for u in study_uids])

    # The studies a zip holds complete are audited with the zip's fate: it is
    # still removed (a full disk) or left unfinished (Ctrl-C) after them.
    zipped: list[tuple[str, str, _Counts]] = []
    fate = ""

    def audit(study_uid: str, patient_id: str, counts: _Counts, stopped: str = "") -> None:
        if out.suffix.lower() == ".zip" and not stopped:
            zipped.append((study_uid, patient_id, counts))
            return
        _audit(pacs, user, study_uid, patient_id, deid, out, counts, stopped, media=layout)

    with ExitStack() as stack:
        sink = _Sink(out, stack)
        try:
            for _ in _export_all(pacs, study_uids, sink, deid, include_burned_in, progress, report, audit,
                                 layout=layout):
                pass  # a folder or a zip file: nothing is streamed
            if layout is not None:
                for _ in finish_media(pacs, layout, sink):
                    pass
            sink.finish()
        except BaseException as exc:
            full = _disk_full(exc, sink.tmp_dir)
            if full is None:
                fate = f"the zip was not finished ({_stopped(exc)}): {getattr(sink, 'partial', out)} left"
                raise
            room = full.errno in _FULL_ERRNOS
            kept = sink.abort(room)
            fate = f"the zip was not finished ({'disk full' if room else full.strerror}): {kept}"
            raise ExportStopped(
                f"{'disk full writing' if room else 'cannot write'} the export "
                f"({full.strerror}{': ' + str(full.filename) if full.filename else ''}): "
                f"stopped after {report.instances} objects; {kept}"
            ) from None
        finally:
            for study_uid, patient_id, counts in zipped:
                _audit(pacs, user, study_uid, patient_id, deid, out, counts, fate, media=layout)
            pacs.audit.flush()
    return report


# Records one study's export in the audit trail: (study, its patient's ID,
# what became of its objects, why it stopped early if it did).
StudyAudit = Callable[[str, str, "_Counts", str], None]


# Why a rejection note is not in an export (pacs.rejections.notes_listing_kept).
STALE_NOTE = ("rejection note left out: it lists images this archive keeps (a rejection lifted, or a note not "
              "applied); the receiver would withdraw them")


def _export_all(
    pacs: Pacs,
    study_uids: list[str],
    sink: Any,
    deid: Deidentifier | None,
    include_burned_in: bool,
    progress: Progress,
    report: ExportReport,
    audit: StudyAudit,
    *,
    layout: Any = None,
    strict: bool = False,
) -> Iterator[bytes]:
    """The export loop of :func:`export_studies`; a full disk propagates.

    A generator of what the sink streams (nothing, but for a media zip sent
    as it is written, :func:`.media.media_zip`). *strict*: an object that
    cannot be exported stops the export (a download must not end as if
    complete without it) instead of being listed in the report."""
    from ..rejections import notes_listing_kept  # pacs.rejections imports this package
    from .media import export_media_item

    for study_uid in study_uids:
        study = _study(pacs, study_uid)
        if study is None:
            report.missing_studies.append(study_uid)
            continue
        overrides = _overrides(pacs, study.pk)
        patient = (study.patient_id or "", study.issuer or "")
        progress.start(f"exporting {study_uid[-24:]}", None)
        before = _Counts.of(report)
        listed: set[str] = set()  # the files of the study this run writes or keeps
        stopped = ""  # why the study ended early, when it did
        try:
            stale_notes = notes_listing_kept(pacs, study_uid)
            # Paged from the index: a study of any size is never listed whole.
            for item in pacs.reader.iter_stored(study_uid):
                progress.advance()
                if item.sop_uid in stale_notes:
                    report.warnings.add({"sop_uid": item.sop_uid, "detail": STALE_NOTE})
                    continue
                try:
                    if layout is not None:
                        yield from export_media_item(pacs, item, sink, layout, deid, overrides, report,
                                                     include_burned_in, patient)
                        continue
                    if deid is None and not overrides:
                        name = f"{item.study_uid}/{item.series_uid}/{item.sop_uid}.dcm"
                        listed.add(name)
                        if sink.has(name, item.size):
                            report.kept += 1
                            continue
                        with pacs.store.open(item.storage_key) as stream:
                            sink.add_stream(stream, name, item.size)
                        size = item.size
                    else:
                        rewritten = _rewrite(pacs, item, sink, deid, overrides, report, include_burned_in, patient,
                                             listed)
                        if rewritten is None:
                            continue
                        size = rewritten
                    report.instances += 1
                    report.bytes += size
                except Exception as exc:  # one bad object must not sink the export
                    if (full := _disk_full(exc, sink.tmp_dir)) is not None:
                        # ... but a full (or read-only) disk sinks every later one as well.
                        stopped = f"stopped: {'disk full' if full.errno in _FULL_ERRNOS else full.strerror}"
                        raise
                    if strict:
                        stopped = f"stopped: {item.sop_uid} failed: {str(exc)[:200]}"
                        raise
                    log.warning("export of %s failed: %s", item.sop_uid, exc)
                    report.failed.add({"sop_uid": item.sop_uid, "detail": str(exc)[:200]})
        except BaseException as exc:
            # However the study ends early (a full disk, Ctrl-C, a download
            # broken off), what was written of it is out of the archive.
            audit(study_uid, study.patient_id, _Counts.of(report) - before, stopped or _stopped(exc))
            raise
        folder = sink.folder()
        if layout is None and folder is not None:
            _remove_stale(folder, deid.uid_map.map(study_uid) if deid else study_uid, listed)
        report.studies += 1
        if deid is not None:
            report.study_map[study_uid] = deid.uid_map.map(study_uid)
        audit(study_uid, study.patient_id, _Counts.of(report) - before, "")


def _stopped(exc: BaseException) -> str:
    """Why an export stopped in the middle of a study, for its audit event."""
    if isinstance(exc, KeyboardInterrupt):
        return "stopped: interrupted"
    if isinstance(exc, GeneratorExit):
        return "stopped: download broken off"
    return f"stopped: {exc.__class__.__name__}: {str(exc)[:200]}"


@dataclass(frozen=True)
class _Counts:
    """What became of a study's objects: the report's counters, subtracted."""

    written: int = 0
    kept: int = 0
    withheld: int = 0
    failed: int = 0

    @staticmethod
    def of(report: ExportReport) -> _Counts:
        return _Counts(report.instances, report.kept, report.not_exported_burned_in.count, report.failed.count)

    def __sub__(self, other: _Counts) -> _Counts:
        return _Counts(self.written - other.written, self.kept - other.kept, self.withheld - other.withheld,
                       self.failed - other.failed)

    def describe(self) -> str:
        """"12 instances written, 3 already there, 1 failed"."""
        parts = [f"{self.written} instances written"]
        if self.kept:
            parts.append(f"{self.kept} already there")
        if self.withheld:
            parts.append(f"{self.withheld} withheld (burned-in annotation)")
        if self.failed:
            parts.append(f"{self.failed} failed")
        return ", ".join(parts)

    @property
    def complete(self) -> bool:
        return not (self.withheld or self.failed)


def _audit(pacs: Pacs, user: str, study_uid: str, patient_id: str, deid: Deidentifier | None, out: Path,
           counts: _Counts, stopped: str = "", *, media: Any = None) -> None:
    """One ``export`` event for a study: where it went, what was written and
    what not (an incomplete export is a failure), the new Study Instance
    UID of a de-identified copy (who received which study)."""
    kind = f"{'de-identified ' if deid else ''}{media.describe() + ' ' if media is not None else ''}export"
    detail = f"{kind} to {out}: {counts.describe()}"
    if stopped:
        detail += f"; {stopped}"
    if deid is not None:
        detail += f"; new Study Instance UID {deid.uid_map.map(study_uid)}"
    complete = counts.complete and not stopped
    pacs.audit.record(
        Event(
            action="export", user=user, protocol="cli", study_uid=study_uid, patient_id=patient_id,
            outcome="success" if complete else "failure", detail=detail,
        )
    )


class Withheld(Exception):
    """A de-identified copy that may not be written (burned-in annotation)."""


def _remove_stale(out: Path, study_folder: str, listed: set[str]) -> None:
    """Remove the files in a study's folder of a folder export that this run
    did not write or keep (*listed*), and the folders they leave empty: an
    earlier run's copies of objects deleted since (sent in error, often
    another patient's) or withheld now (burned-in annotation), which
    whoever imports the folder would take."""
    prune_files(out / study_folder,
                lambda path: path.suffix == ".dcm" and "/".join(path.relative_to(out).parts) not in listed)


def _current(existing: Path, item: StoredInstance, deid: Deidentifier | None,
             overrides: tuple[tuple[str, str], ...], patient: tuple[str, str] | None) -> bool:
    """Whether the file an earlier run wrote for *item* may stay: it reads,
    names the object, and carries the index's current corrections (a
    de-identified one: the pseudonym of the study's patient now). The study
    may have been reconciled with the HIS since: the file would still name
    the modality's patient."""
    from .media import _carries, _header, _pseudonymous

    header = _header(existing)
    sop_uid = deid.uid_map.map(item.sop_uid) if deid else item.sop_uid
    if header is None or str(header.file_meta.get("MediaStorageSOPInstanceUID", "")) != sop_uid:
        return False
    if deid is None:
        return _carries(header, overrides)
    return _pseudonymous(header, deid, patient or ("", ""))


def _rewrite(
    pacs: Pacs,
    item: StoredInstance,
    sink: _Sink,
    deid: Deidentifier | None,
    overrides: tuple[tuple[str, str], ...],
    report: ExportReport,
    include_burned_in: bool = False,
    patient: tuple[str, str] | None = None,
    listed: set[str] | None = None,
) -> int | None:
    """Correct and/or de-identify one object; returns its size (None:
    already exported or left out). Its name goes to *listed* unless it is
    left out."""
    names: list[str] = []
    edit = deid_edit(item, deid, report, include_burned_in, patient, names)
    try:
        with edited_object(pacs, item, overrides, edit) as write:
            name = names[-1]
            if listed is not None:
                listed.add(name)
            existing = sink.existing(name)
            if existing is not None and _current(existing, item, deid, overrides, patient):
                report.kept += 1
                return None
            return _write(sink, name, write)
    except Withheld as exc:
        report.not_exported_burned_in.add({"sop_uid": item.sop_uid, "detail": str(exc)})
        return None


def deid_edit(item: StoredInstance, deid: Deidentifier | None, report: ExportReport, include_burned_in: bool,
              patient: tuple[str, str] | None, names: list[str]) -> Callable[[Dataset], None]:
    """The change an export makes to an object's header: de-identification
    (raising :class:`Withheld` for burned-in annotation it may not release),
    then the object's name (study/series/instance UIDs) noted in *names*."""

    def edit(ds: Dataset) -> None:
        if deid is not None:
            release = may_release(ds, include_burned_in=include_burned_in)
            if not release.allowed:
                raise Withheld(release.reason)
            if release.reason:
                # Written although its pixels say they identify: the operator's choice.
                declared = burned_in(ds) and "PixelData" in ds
                listed = report.burned_in_included if declared else report.warnings
                listed.add({"sop_uid": item.sop_uid, "detail": release.reason})
            deid.apply(ds, patient=patient)
        names.append(f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm")

    return edit


@contextlib.contextmanager
def edited_object(pacs: Pacs, item: StoredInstance, overrides: tuple[tuple[str, str], ...],
                  edit: Callable[[Dataset], None], target: str | None = None) -> Iterator[Callable[[Path], None]]:
    """*item* corrected, changed by *edit* and, with *target*, converted to
    that transfer syntax: yields the function that writes it to a path
    (*edit* has run by then: the caller can name the file).

    Only the header is read and rewritten when the object is laid out for
    it: the stored Pixel Data follow, copied by byte range (a 600 MB object
    was held whole, twice), or decoded frame by frame to an uncompressed
    *target*. Otherwise the object is read with its large values left on
    disk until written (deferred reads); converted whole, it must be small
    enough (:func:`pacs.transcode.check_whole_size`)."""
    from ..retrieve import apply_overrides
    from ..transcode import convert_dataset

    stored = item.transfer_syntax_uid
    plan = _header_only(pacs, item, overrides, edit, target)
    if plan is not None:
        try:
            yield lambda out: _write_chunks(out, plan.part10())
        finally:
            if isinstance(plan, CodecPlan):
                plan.resources.close()  # also when the object was not written after all
        return
    with pacs.store.local_path(item.storage_key) as path:
        if target and target != stored:
            check_whole_size(path, _retrieve_item(item, None, overrides), UID(target))
        ds = dcmread(path, defer_size=256 * 1024)
        apply_overrides(ds, overrides)
        edit(ds)
        if target and target != stored:
            try:
                convert_dataset(ds, UID(stored), UID(target))
            except Exception as exc:
                raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {UID(target).name}: {exc}") from exc
        yield lambda out: ds.save_as(out, enforce_file_format=True)


def pixel_offset(pacs: Pacs, sop_uid: str) -> int | None:
    """Where the indexed object's Pixel Data element starts (None: it has none)."""
    with pacs.engine.connect() as conn:
        return conn.execute(select(instances_t.c.pixel_offset).where(instances_t.c.sop_uid == sop_uid)).scalar()


def _retrieve_item(item: StoredInstance, offset: int | None, overrides: tuple[tuple[str, str], ...]) -> Any:
    from ..retrieve import RetrieveItem

    return RetrieveItem(item.sop_uid, item.sop_class_uid, item.transfer_syntax_uid, item.storage_key, item.size,
                        item.study_uid, item.series_uid, item.sha256, pixel_offset=offset, overrides=overrides)


def _header_only(pacs: Pacs, item: StoredInstance, overrides: tuple[tuple[str, str], ...],
                 edit: Callable[[Dataset], None], target: str | None = None) -> StreamPlan | CodecPlan | None:
    """*item* in its stored syntax (or *target*) with *edit* made to its
    header, its Pixel Data to be copied from the store (or decoded frame by
    frame); None when it is not laid out for that (no pixel data, Deflated
    or Big Endian, an unusual layout)."""
    offset = pixel_offset(pacs, item.sop_uid)
    if offset is None:
        return None
    stored = _retrieve_item(item, offset, overrides)
    opener = lambda offset, length: pacs.store.open(item.storage_key, offset, length)  # noqa: E731
    wanted = target or item.transfer_syntax_uid
    plan: StreamPlan | CodecPlan | None = stream_plan(opener, stored, wanted, edit)
    if plan is None and wanted != item.transfer_syntax_uid:
        plan = decode_plan(pacs, stored, wanted, edit)
    return plan


def _write_chunks(out: Path, chunks: Iterator[bytes]) -> None:
    with open(out, "wb") as dest:
        for chunk in chunks:
            dest.write(chunk)


def _write(sink: _Sink, name: str, write: Callable[[Path], None]) -> int:
    """Write one object under *name* with *write*; its size."""
    tmp = sink.temp_file()
    try:
        write(tmp)
        size = tmp.stat().st_size
        sink.add_file(tmp, name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size
