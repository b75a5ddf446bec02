"""``pacs migrate``: copy every indexed object to another store, verified.

Each object is streamed from the source to the target (never whole in
memory), then read back from the target and its sha256 compared with the
index. The source is never modified.

Resuming: progress is checkpointed in ``DATA_DIR/migrate-<target hash>.json``
as the highest instance primary key below which every row is done (rows are
taken in primary-key order, in batches). On a rerun, rows at or below the
checkpoint cost one ``stat`` of the target (an object gone or of another size
is copied again); rows above it whose object is already in the target with
the right size are read back and kept when the sha256 matches (nothing is
rewritten). A failed copy never stays in the target, so a rerun retries it.
``limit`` stops after that many copies (maintenance windows); rerun to go on.

Objects received while the copy runs are picked up as long as they arrive
before the last page is read; for a final switch stop ``pacs serve``, rerun
with ``switch=True`` (fast: everything done is skipped), then start again.
Orphan objects (not indexed) are not copied: run ``pacs verify --repair`` first.

``switch=True``, only after a complete run without failures, sets
``storage_url`` in the config file the appliance reads (``--config``,
``$PACS_CONFIG`` or ``DATA_DIR/pacs.toml``; other keys are kept, the previous
file is saved as ``.bak``). S3 keys stay in the environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from storage import ObjectNotFound, ObjectStore, StorageError, file_store_path, open_store

from ..app import Pacs
from ..settings import Settings
from .common import BATCH, Capped, NullProgress, Progress, count_rows, instances_t

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
    complete: bool = False
    stopped_at_limit: bool = False
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
            "complete": self.complete,
            "stopped_at_limit": self.stopped_at_limit,
            "switched": self.switched,
            "config_file": self.config_file,
            "warnings": self.warnings,
        }


def _redacted(url: str) -> str:
    return re.sub(r"(access_key|secret_key)=[^&]*", r"\1=***", url)


class _Checkpoint:
    def __init__(self, data_dir: Path, target_url: str) -> None:
        name = hashlib.sha1(target_url.encode()).hexdigest()[:12]
        self.path = Path(data_dir) / f"migrate-{name}.json"
        self.target_url = target_url

    def load(self) -> int:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return 0
        return int(data.get("last_pk", 0)) if data.get("target") == _redacted(self.target_url) else 0

    def save(self, last_pk: int, **extra: Any) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"target": _redacted(self.target_url), "last_pk": last_pk, **extra}))
        os.replace(tmp, self.path)


def _copy_one(source: ObjectStore, target: ObjectStore, row: Any, checkpointed: bool) -> tuple[str, str]:
    """("copied" | "present" | "failed", detail) for one index row."""
    key = row.storage_key
    written = False
    try:
        try:
            present = target.stat(key).size == row.size_bytes
        except ObjectNotFound:
            present = False
        if present and (checkpointed or target.checksum(key) == row.sha256):
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
    except StorageError as exc:
        detail = str(exc)
    if written:
        # Nothing unverified may stay in the target: a rerun trusts what the
        # checkpoint passed when its size is right.
        try:
            target.delete(key)
        except StorageError:
            log.warning("could not remove the failed copy of %s from the target", key)
    return "failed", detail


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
        report = MigrateReport(source=_redacted(pacs.store.url), target=_redacted(target.url))
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
        # What arrived between the copy and the lock.
        _run(pacs, target, report, None, workers, progress, after_checkpoint=True)
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


def _run(pacs: Pacs, target: ObjectStore, report: MigrateReport, limit: int | None, workers: int,
         progress: Progress, *, after_checkpoint: bool = False) -> None:
    checkpoint = _Checkpoint(pacs.settings.data_dir, target.url)
    done_pk = checkpoint.load()
    report.total = count_rows(pacs.engine, instances_t)
    progress.start("copying objects", report.total)
    columns = (instances_t.c.pk, instances_t.c.storage_key, instances_t.c.size_bytes, instances_t.c.sha256)
    last_pk = done_pk if after_checkpoint else 0
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
            results = pool.map(lambda r, done=done_pk: _copy_one(pacs.store, target, r, r.pk <= done), rows)
            for row, (state, detail) in zip(rows, results, strict=True):
                progress.advance()
                if state == "copied":
                    report.copied += 1
                    report.copied_bytes += row.size_bytes
                elif state == "present":
                    report.already_present += 1
                else:
                    report.failed.add({"key": row.storage_key, "detail": detail})
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
