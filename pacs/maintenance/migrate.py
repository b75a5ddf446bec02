"""``pacs migrate``: copy every indexed object to another store, verified.

Each object is streamed from the source to the target (never whole in
memory), then read back from the target and its sha256 compared with the
index. The source is never modified.

Resuming: progress is checkpointed in ``DATA_DIR/migrate-<target hash>.json``
as the highest instance primary key below which every row is done (rows are
taken in primary-key order, in batches), and ``migrate-<target hash>.sha256``
keeps, per row verified in the target, its primary key and the first 64 bits
of the sha256 it was verified against (~25 bytes a row on disk, 16 in
memory). On a rerun, a row whose sha256 is the one recorded costs one
``stat`` of the target (an object gone or of another size is copied again);
any other row whose object is already in the target with the right size is
read back and kept when the sha256 matches (nothing is rewritten). A row
whose sha256 changed since its copy (a corrected resend under the overwrite
policy keeps its primary key, its key and often its size) is thus copied
again. A failed copy never stays in the target, so a rerun retries it. A
full target stops the run at its first full write (``stopped``): the others
would fail the same way, one by one.
``limit`` stops after that many copies (maintenance windows); rerun to go on.

Objects received while the copy runs are picked up as long as they arrive
before the last page is read; for a final switch stop ``pacs serve``, rerun
with ``switch=True`` (fast: everything done is skipped), then start again.
Orphan objects (not indexed) are not copied: run ``pacs verify --repair`` first.

``switch=True``, only after a complete run without failures, makes a last
pass alone (no ``pacs serve`` on the data dir): every row is compared with
its recorded sha256, from the index and the local record only, and only rows
added or changed since their copy touch the target (re-reading a million
objects from S3 while the service is down is what this avoids). Then it
lists the target and deletes every object no index row references: copies
of instances deleted, purged or replaced (compress) since they were copied,
which after the switch ``pacs verify --repair`` would adopt back (a study
deleted for the wrong patient reappearing). Deleted, not set aside: they are
copies of objects a deletion removed from the current store, and a set-aside
copy would keep what a deletion was meant to remove, with nobody to clear
it. They go through tombstones like any deletion, so an object a node
already on the new store is receiving at that moment is kept or refused for
a retry, never lost. Keys outside the store's layout are left (verify
reports them, never adopts them). Then it sets ``storage_url`` in the config
file the appliance reads (``--config``, ``$PACS_CONFIG`` or
``DATA_DIR/pacs.toml``; other keys are kept, the previous file is saved as
``.bak``). S3 keys stay in the environment. The target must hold this
archive's objects only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import tomllib
from array import array
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from storage import (ObjectNotFound, ObjectStore, StorageError, StorageFullError, file_store_path, open_store,
                     validate_key)

from ..app import Pacs
from ..index import tombstones
from ..index.db import write_transaction
from ..settings import Settings
from .common import BATCH, Capped, NullProgress, Progress, batched, count_rows, indexed_among, instances_t

log = logging.getLogger(__name__)


@dataclass
class MigrateReport:
    source: str
    target: str
    total: int = 0
    copied: int = 0
    copied_bytes: int = 0
    already_present: int = 0
    failed: Capped = field(default_factory=Capped)
    # Objects of the target no index row references, deleted by the switch.
    removed_unreferenced: int = 0
    complete: bool = False
    stopped_at_limit: bool = False
    # Why the run ended before its last object (the target full), or None.
    stopped: str | None = None
    switched: bool = False
    config_file: str = ""
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "total": self.total,
            "copied": self.copied,
            "copied_bytes": self.copied_bytes,
            "already_present": self.already_present,
            "failed": self.failed.as_dict(),
            "removed_unreferenced": self.removed_unreferenced,
            "complete": self.complete,
            "stopped_at_limit": self.stopped_at_limit,
            "stopped": self.stopped,
            "switched": self.switched,
            "config_file": self.config_file,
            "warnings": self.warnings,
        }


def redacted_url(url: str) -> str:
    """*url* without the S3 keys it may carry (reports, the audit trail)."""
    return re.sub(r"(access_key|secret_key)=[^&]*", r"\1=***", url)


def _short(sha256: str) -> int:
    """The part of a sha256 the record keeps (a changed object is told by it)."""
    return int(sha256[:16], 16)


class _Sums:
    """Row primary key -> short sha256 the row's object was verified against
    in the target. Sorted arrays (16 bytes a row) rather than a dict (over
    100 on a million rows); rows are recorded in primary-key order but for
    the few copied again, which are updated in place."""

    def __init__(self) -> None:
        self.pks = array("q")
        self.values = array("Q")
        self.extra: dict[int, int] = {}

    def add(self, pk: int, value: int) -> None:
        if not self.pks or pk > self.pks[-1]:
            self.pks.append(pk)
            self.values.append(value)
            return
        i = bisect_left(self.pks, pk)
        if i < len(self.pks) and self.pks[i] == pk:
            self.values[i] = value
        else:
            self.extra[pk] = value

    def get(self, pk: int) -> int | None:
        if pk in self.extra:
            return self.extra[pk]
        i = bisect_left(self.pks, pk)
        return self.values[i] if i < len(self.pks) and self.pks[i] == pk else None


class _Checkpoint:
    def __init__(self, data_dir: Path, target_url: str) -> None:
        name = hashlib.sha1(target_url.encode()).hexdigest()[:12]
        self.path = Path(data_dir) / f"migrate-{name}.json"
        self.sums_path = Path(data_dir) / f"migrate-{name}.sha256"
        self.target_url = target_url

    def load(self) -> int:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return 0
        return int(data.get("last_pk", 0)) if data.get("target") == redacted_url(self.target_url) else 0

    def save(self, last_pk: int, **extra: Any) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"target": redacted_url(self.target_url), "last_pk": last_pk, **extra}))
        os.replace(tmp, self.path)

    def load_sums(self, fresh: bool) -> _Sums:
        """The rows verified in the target; none when *fresh* (no checkpoint,
        or one of another target: nothing in the target is vouched for)."""
        sums = _Sums()
        if fresh:
            self.sums_path.unlink(missing_ok=True)
            return sums
        try:
            with self.sums_path.open(encoding="ascii", errors="replace") as f:
                for line in f:
                    pk, _, value = line.partition(" ")
                    try:
                        sums.add(int(pk), int(value, 16))
                    except ValueError:
                        continue  # a line cut by a crash: that row is checked again
        except FileNotFoundError:
            pass
        return sums

    def record(self, sums: _Sums, rows: list[tuple[int, str]]) -> None:
        """Record rows verified in the target. A record lost in a crash only
        costs reading that object back on the next run."""
        with self.sums_path.open("a", encoding="ascii") as f:
            for pk, sha256 in rows:
                sums.add(pk, _short(sha256))
                f.write(f"{pk} {sha256[:16]}\n")


def _copy_one(source: ObjectStore, target: ObjectStore, row: Any, verified: bool) -> tuple[str, str]:
    """("copied" | "present" | "failed", detail) for one index row;
    *verified*: the target held the row's sha256 under its key when last checked."""
    key = row.storage_key
    written = False
    state = "failed"
    try:
        try:
            present = target.stat(key).size == row.size_bytes
        except ObjectNotFound:
            present = False
        if present and (verified or target.checksum(key) == row.sha256):
            return "present", ""
        with source.open(key) as stream:
            written = True
            info = target.put(key, stream, row.size_bytes)
        if info.sha256 is not None and info.sha256 != row.sha256:
            detail = "the source object does not match its index checksum (run pacs verify)"
        elif target.checksum(key) != row.sha256:
            detail = "the copy read back from the target differs"
        else:
            return "copied", ""
    except ObjectNotFound:
        return "failed", "the source object is missing (run pacs verify)"
    except StorageFullError as exc:
        state, detail = "full", str(exc)
    except StorageError as exc:
        detail = str(exc)
    if written:
        # Nothing unverified may stay in the target: a rerun trusts what the
        # record vouches for when its size is right.
        try:
            target.delete(key)
        except StorageError:
            log.warning("could not remove the failed copy of %s from the target", key)
    return state, detail


def migrate(
    pacs: Pacs,
    target_url: str,
    *,
    switch: bool = False,
    limit: int | None = None,
    workers: int = 4,
    access_key: str | None = None,
    secret_key: str | None = None,
    progress: Progress | None = None,
) -> MigrateReport:
    """Copy every indexed object to *target_url* (see module doc)."""
    progress = progress or NullProgress()
    target = open_store(
        target_url,
        access_key=access_key or pacs.settings.s3_access_key or os.environ.get("PACS_S3_ACCESS_KEY"),
        secret_key=secret_key or pacs.settings.s3_secret_key or os.environ.get("PACS_S3_SECRET_KEY"),
    )
    try:
        if target.url == pacs.store.url:
            raise ValueError(f"the target is the current store ({target.url})")
        _refuse_nested(pacs.store.url, target.url)
        report = MigrateReport(source=redacted_url(pacs.store.url), target=redacted_url(target.url))
        _run(pacs, target, report, limit, workers, progress)
        if switch:
            _switch(pacs, target, target_url, report, workers, progress)
    finally:
        target.close()
    return report


def _switch(pacs: Pacs, target: ObjectStore, target_url: str, report: MigrateReport, workers: int,
            progress: Progress) -> None:
    """Point the config file at *target*, once nothing can store into the old
    store any more: a server still running would go on writing there, and
    what it acknowledged would be missing after its restart."""
    from ..running import no_server_running

    if not report.complete:
        report.warnings.append("not switched: the copy is incomplete or had failures")
        return
    with no_server_running(pacs.settings.data_dir) as alone:
        # The config file switched is this node's (other nodes have their own).
        if not alone:
            report.warnings.append(f"not switched: pacs serve runs on {pacs.settings.data_dir}; objects it "
                                   "receives would stay in the old store. "
                                   "Stop every pacs serve and run the same command again (it copies what "
                                   "arrived meanwhile, then switches)")
            return
        # What arrived or changed between the copy and the lock.
        _run(pacs, target, report, None, workers, progress, final=True)
        if report.complete:
            _remove_unreferenced(pacs, target, report, progress)
        if not report.complete:
            report.warnings.append("not switched: the copy is incomplete or had failures")
            return
        path = config_path(pacs.settings)
        set_config_value(path, "storage_url", target_url)
        report.switched = True
        report.config_file = str(path)
        if os.environ.get("PACS_STORAGE_URL"):
            report.warnings.append("PACS_STORAGE_URL is set and overrides the config file: unset it")
        if target_url.startswith("s3://"):
            report.warnings.append("only storage_url was written: pacs serve needs the S3 keys too "
                                   "(PACS_S3_ACCESS_KEY and PACS_S3_SECRET_KEY in its environment, or "
                                   "s3_access_key and s3_secret_key in the config file)")


def _refuse_nested(source_url: str, target_url: str) -> None:
    """A folder store inside the other one: each would list the other's
    files as its own (orphans, and a copy of the copy)."""
    source, target = file_store_path(source_url), file_store_path(target_url)
    if source is None or target is None:
        return
    a, b = Path(source).resolve(), Path(target).resolve()
    if a == b:
        raise ValueError(f"the target is the current store ({target})")
    if a in b.parents or b in a.parents:
        raise ValueError(f"the target {target} and the current store {source} must not be inside one another")


def _remove_unreferenced(pacs: Pacs, target: ObjectStore, report: MigrateReport, progress: Progress) -> None:
    """Delete from *target* the objects no index row references (see module
    doc); one that cannot be is a failure: the switch waits for a rerun."""
    progress.start("removing objects no index row references from the target", None)
    strays = Capped(cap=1)
    for keys in batched(info.key for info in target.list()):
        progress.advance(len(keys))
        indexed = indexed_among(pacs.engine, keys)
        unreferenced = []
        for key in keys:
            if key in indexed:
                continue
            try:
                validate_key(key)
            except ValueError:
                strays.add(key)
                continue
            unreferenced.append(key)
        if not unreferenced:
            continue
        with write_transaction(pacs.engine) as conn:
            tombstones.record(conn, unreferenced, "migrate")
        done = tombstones.finish(pacs.engine, target, unreferenced)
        report.removed_unreferenced += len(done.deleted)
        for key, detail in done.failed:
            report.failed.add({"key": key, "detail": f"not indexed, could not be deleted from the target: {detail}"})
        # Kept: indexed again meanwhile (fine), or its tombstone finished by
        # another node's sweep on its own store: still here, still unreferenced.
        left = [key for key in done.kept if key not in indexed_among(pacs.engine, [key]) and target.exists(key)]
        for key in left:
            report.failed.add({"key": key, "detail": "not indexed and still in the target: run again"})
    if strays.count:
        report.warnings.append(f"{strays.count} files in the target are not objects of its layout, left as they "
                               f"are (pacs verify lists them), e.g. {strays.items[0]}")
    if report.failed.count:
        report.complete = False


def _run(pacs: Pacs, target: ObjectStore, report: MigrateReport, limit: int | None, workers: int,
         progress: Progress, *, final: bool = False) -> None:
    """Copy what the target lacks (see module doc). *final*: the switch's
    last pass, where a row recorded with its current sha256 is not even
    looked up in the target (the run just before checked them all)."""
    checkpoint = _Checkpoint(pacs.settings.data_dir, target.url)
    done_pk = checkpoint.load()
    sums = checkpoint.load_sums(fresh=done_pk == 0)
    report.total = count_rows(pacs.engine, instances_t)
    progress.start("copying objects", report.total)
    columns = (instances_t.c.pk, instances_t.c.storage_key, instances_t.c.size_bytes, instances_t.c.sha256)
    last_pk = 0
    full = threading.Event()

    def copy(row: Any, verified: bool) -> tuple[str, str]:
        # Once the target is full, the objects not yet begun are left for
        # the rerun: each would fail the same way, one by one.
        if full.is_set():
            return "left", ""
        state, detail = _copy_one(pacs.store, target, row, verified)
        if state == "full":
            full.set()
        return state, detail

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while True:
            page = BATCH if limit is None else max(1, min(BATCH, limit - report.copied))
            with pacs.engine.connect() as conn:
                rows = conn.execute(
                    select(*columns).where(instances_t.c.pk > last_pk).order_by(instances_t.c.pk).limit(page)
                ).all()
            if not rows:
                report.complete = report.failed.count == 0
                return
            if limit is not None and report.copied >= limit:
                report.stopped_at_limit = True
                return
            verified = {row.pk for row in rows if sums.get(row.pk) == _short(row.sha256)}
            todo = [row for row in rows if not (final and row.pk in verified)]
            progress.advance(len(rows) - len(todo))
            results = pool.map(lambda r: copy(r, r.pk in verified), todo)
            checked: list[tuple[int, str]] = []
            for row, (state, detail) in zip(todo, results, strict=True):
                progress.advance()
                if state == "copied":
                    report.copied += 1
                    report.copied_bytes += row.size_bytes
                elif state == "present":
                    report.already_present += 1
                elif state == "left":
                    continue
                else:
                    report.failed.add({"key": row.storage_key, "detail": detail})
                    if state == "full" and report.stopped is None:
                        # As compress does: every later object would fail the same way, one by one.
                        report.stopped = (f"the target is full: migrate stopped at {row.storage_key} ({detail}); "
                                          "free space there (or choose a larger target), then run it again")
                        log.error("%s", report.stopped)
                    continue
                if row.pk not in verified:
                    checked.append((row.pk, row.sha256))
            if checked:
                checkpoint.record(sums, checked)
            if report.stopped is not None:
                return  # this page's copies stay recorded; the checkpoint does not pass the failed ones
            last_pk = rows[-1].pk
            if last_pk > done_pk:
                # Failed rows left nothing in the target: a rerun copies them
                # again even though the checkpoint passed them.
                done_pk = last_pk
                checkpoint.save(done_pk, copied=report.copied, failed=report.failed.count)


def config_path(settings: Settings) -> Path:
    """The config file the appliance reads (the one a switch must change)."""
    explicit = settings.config_file or os.environ.get("PACS_CONFIG")
    return Path(explicit) if explicit else Path(settings.data_dir) / "pacs.toml"


_TABLE_HEADER = re.compile(r"^\s*\[")


def set_config_value(path: Path, key: str, value: str) -> None:
    """Create or update the top-level ``key = "value"`` of a TOML file,
    keeping every other line; the result is checked by parsing it."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    before = tomllib.loads(old) if old else {}
    lines = old.splitlines()
    # json.dumps gives a valid TOML basic string (escapes are compatible).
    entry = f"{key} = {json.dumps(value, ensure_ascii=False)}"
    assignment = re.compile(rf"^\s*{re.escape(key)}\s*=")
    top_end = next((i for i, line in enumerate(lines) if _TABLE_HEADER.match(line)), len(lines))
    for i in range(top_end):
        if assignment.match(lines[i]):
            lines[i] = entry
            break
    else:
        lines.insert(top_end, entry)
    text = "\n".join(lines) + "\n"
    after = tomllib.loads(text)
    expected = {**before, key: value}
    if after != expected:
        raise ValueError(f"could not update {path} safely; set {entry} by hand")
    path.parent.mkdir(parents=True, exist_ok=True)
    if old:
        path.with_name(path.name + ".bak").write_text(old, encoding="utf-8")
    fd, tmp = tempfile.mkstemp(prefix=".pacs-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
