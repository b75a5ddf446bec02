"""Storage maintenance through the `pacs` CLI, on real peers: verify (and
repair), reindex, migrate (filesystem <-> SeaweedFS S3, PostgreSQL), purge,
compress and export. Damage is done with the store API directly, the way a
crash or a failing disk would leave things."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, generate_uid
from sqlalchemy import insert, select

from pacs.app import Pacs
from pacs.index import create_index_engine, tombstones
from pacs.index.models import (
    Instance,
    Patient,
    PatientIdentifier,
    Report,
    Series,
    Study,
)
from pacs.settings import load_settings
from storage import FileStore, open_store

from .conftest import PACS, S3_ACCESS, S3_SECRET, pydicom_file
from .qr_corpus import study_uid, write_corpus
from .peers import PACS_COMMANDS

S3_ENV = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
# pydicom files added to the synthetic corpus: images of several kinds, a
# 1-bit segmentation no lossless codec takes, a structured report (no pixels).
EXTRA_FILES = ["CT_small.dcm", "MR_small.dcm", "SC_rgb.dcm", "liver.dcm", "test-SR.dcm"]


class Cli:
    """`pacs` as a subprocess against one data dir (and index/store URLs)."""

    def __init__(self, data_dir: Path, index_url: str | None = None, storage_url: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir, self.index_url, self.storage_url = data_dir, index_url, storage_url
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")} | (env or {})

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [PACS, *args, "--data-dir", str(self.data_dir)]
        if self.index_url:
            cmd += ["--index-url", self.index_url]
        if self.storage_url:
            cmd += ["--storage-url", self.storage_url]
        # Forked from the tests' zygote (pacs imported once), as PacsServer.cli is.
        return PACS_COMMANDS.run(cmd[1:], self.env, timeout=300)

    def json(self, *args: str, rc: int = 0) -> dict[str, Any]:
        result = self(*args, "--json")
        assert result.returncode == rc, f"pacs {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        return json.loads(result.stdout)

    @contextmanager
    def core(self) -> Iterator[Pacs]:
        """The core on the same index and store, for checks in the test."""
        settings = load_settings(data_dir=self.data_dir, index_url=self.index_url, storage_url=self.storage_url,
                                 s3_access_key=self.env.get("PACS_S3_ACCESS_KEY"),
                                 s3_secret_key=self.env.get("PACS_S3_SECRET_KEY"))
        pacs = Pacs.open(settings, migrate=False)
        try:
            yield pacs
        finally:
            pacs.close()


def _inputs(out: Path) -> Path:
    write_corpus(out)
    for name in EXTRA_FILES:
        shutil.copy(pydicom_file(name), out / name)
    return out


@pytest.fixture(scope="session")
def archive_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite + filesystem archive of the corpus, imported once."""
    root = tmp_path_factory.mktemp("maintenance")
    src = _inputs(root / "in")
    data = root / "data"
    summary = Cli(data).json("import", str(src))
    assert summary["stored"] == len(list(src.iterdir())) and summary["failed"] == 0
    return data


@pytest.fixture
def archive(tmp_path: Path, archive_template: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(archive_template, data)
    return data


def _new_instance_bytes_of_ct() -> tuple[Any, bytes]:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ds, buffer.getvalue()


def _new_instance_bytes(pacs: Pacs) -> tuple[str, bytes]:
    """A valid object of an existing study that was stored but never indexed:
    what a crash between the object write and the index commit leaves."""
    ds, data = _new_instance_bytes_of_ct()
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm", data


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- verify -------------------------------------------------------------------------
def test_verify_finds_damage_and_repair_adopts_the_orphan(archive: Path) -> None:
    cli = Cli(archive)
    store = FileStore(archive / "objects")
    with cli.core() as pacs:
        items = list(pacs.reader.iter_stored())
        before = pacs.reader.stats()
        orphan_key, orphan = _new_instance_bytes(pacs)
    missing, corrupt = items[0], items[1]
    store.delete(missing.storage_key)
    good = store.read_bytes(corrupt.storage_key)
    bad = bytearray(good)
    bad[-4:] = bytes(b ^ 0xFF for b in bad[-4:])  # same size, flipped pixel bits
    store.put(corrupt.storage_key, io.BytesIO(bytes(bad)))
    store.put(orphan_key, io.BytesIO(orphan))
    store.put("lost+found/x/junk.dcm", io.BytesIO(b"not DICOM at all"))

    report = cli.json("verify", rc=1)
    assert report["checked"] == before.instances and report["stored_objects"] == before.instances + 1
    assert [m["key"] for m in report["missing"]["items"]] == [missing.storage_key]
    assert [c["key"] for c in report["corrupt"]["items"]] == [corrupt.storage_key]
    assert "sha256" in report["corrupt"]["items"][0]["detail"]
    orphans = {o["key"]: o["valid"] for o in report["orphans"]["items"]}
    assert orphans == {orphan_key: True, "lost+found/x/junk.dcm": False}
    assert report["problems"] == 4 and report["adopted"]["count"] == 0

    repaired = cli.json("verify", "--repair", rc=1)
    assert [a["key"] for a in repaired["adopted"]["items"]] == [orphan_key]
    assert [i["key"] for i in repaired["invalid_orphans"]["items"]] == ["lost+found/x/junk.dcm"]
    assert repaired["missing"]["count"] == 1 and repaired["corrupt"]["count"] == 1
    with cli.core() as pacs:
        assert pacs.reader.stats().instances == before.instances + 1
        assert pacs.reader.instance_key(orphan_key.split("/")[-1][:-4]) == orphan_key
    assert store.read_bytes(orphan_key) == orphan  # adopted as it was
    assert store.exists("lost+found/x/junk.dcm")  # invalid orphans are never deleted

    dropped = cli.json("verify", "--repair", "--drop-missing", rc=1)
    assert dropped["dropped"]["instances"] == 1
    assert dropped["problems"] == 2  # the corrupt object and the invalid orphan are left to a human
    with cli.core() as pacs:
        assert pacs.reader.instance_key(missing.sop_uid) is None
        assert pacs.reader.stats().instances == before.instances

    store.put(corrupt.storage_key, io.BytesIO(good))  # restored from a backup
    store.delete("lost+found/x/junk.dcm")
    final = cli("verify")
    assert final.returncode == 0, final.stdout + final.stderr
    assert "index and storage agree" in final.stdout
    assert cli("verify", "--drop-missing").returncode == 2


# -- reindex ----------------------------------------------------------------------------
def _snapshot(index_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the archive's index, without the times of the rebuild."""
    engine = create_index_engine(index_url)
    queries = {
        "patients": select(Patient.patient_id, Patient.issuer, Patient.name, Patient.name_folded,
                           Patient.birth_date, Patient.sex),
        "identifiers": select(Patient.patient_id, PatientIdentifier.value, PatientIdentifier.issuer,
                              PatientIdentifier.id_type).join(Patient, Patient.pk == PatientIdentifier.patient_pk),
        "studies": select(Study.study_uid, Patient.patient_id, Study.study_date, Study.study_time,
                          Study.accession_number, Study.study_id, Study.referring_physician, Study.description,
                          Study.institution, Study.modalities, Study.num_series, Study.num_instances,
                          Study.size_bytes).join(Patient, Patient.pk == Study.patient_pk),
        "series": select(Series.series_uid, Study.study_uid, Series.modality, Series.series_number,
                         Series.description, Series.body_part, Series.station_name, Series.series_date,
                         Series.num_instances, Series.size_bytes).join(Study, Study.pk == Series.study_pk),
        "instances": select(Instance.sop_uid, Series.series_uid, Instance.sop_class_uid,
                            Instance.transfer_syntax_uid, Instance.instance_number, Instance.rows, Instance.columns,
                            Instance.frames, Instance.bits_allocated, Instance.photometric, Instance.charset,
                            Instance.content_date, Instance.size_bytes, Instance.sha256, Instance.storage_key,
                            Instance.pixel_offset).join(Series, Series.pk == Instance.series_pk),
    }
    try:
        with engine.connect() as conn:
            return {name: sorted(tuple(r) for r in conn.execute(q)) for name, q in queries.items()}
    finally:
        engine.dispose()


def test_reindex_rebuilds_the_lost_index_from_storage(archive: Path) -> None:
    cli = Cli(archive)
    index_url = f"sqlite:///{archive / 'index.sqlite'}"
    before = _snapshot(index_url)
    assert len(before["instances"]) == len(list((archive / "objects").rglob("*.dcm")))
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (archive / name).unlink(missing_ok=True)
    assert cli.json("db", "upgrade")["revision"]
    assert _snapshot(index_url)["instances"] == []

    rebuilt = cli.json("reindex")
    assert rebuilt["indexed"] == rebuilt["listed"] == len(before["instances"])
    assert rebuilt["failed"]["count"] == 0 and rebuilt["duplicates"]["count"] == 0
    assert _snapshot(index_url) == before

    # Interrupted or repeated: what is indexed is skipped, nothing is added twice.
    again = cli.json("reindex")
    assert again["already_indexed"] == len(before["instances"]) and again["indexed"] == 0
    assert _snapshot(index_url) == before


# -- migrate ----------------------------------------------------------------------------
def test_migrate_filesystem_to_s3_and_back_with_switch(archive: Path, tmp_path: Path, s3_bucket_url: str) -> None:
    cli = Cli(archive, env=S3_ENV)
    (archive / "pacs.toml").write_text(
        '# site config\nae_title = "MIGRATED"\n\n[[ae]]\ntitle = "CT_ROOM1"\nhost = "10.0.0.5"\nport = 104\n'
    )
    with cli.core() as pacs:
        shas = {i.storage_key: i.sha256 for i in pacs.reader.iter_stored()}
    n = len(shas)

    first = cli.json("migrate", "--to", s3_bucket_url, "--limit", "3")
    assert first["copied"] == 3 and not first["complete"] and first["stopped_at_limit"]
    rest = cli.json("migrate", "--to", s3_bucket_url, "--switch")
    assert rest["copied"] == n - 3 and rest["already_present"] == 3
    assert rest["complete"] and rest["switched"] and rest["failed"]["count"] == 0
    config = tomllib.loads((archive / "pacs.toml").read_text())
    assert config["storage_url"] == s3_bucket_url
    assert config["ae_title"] == "MIGRATED" and config["ae"][0]["title"] == "CT_ROOM1"

    # The next start uses S3: the old folder can go and everything verifies.
    shutil.move(archive / "objects", tmp_path / "old-objects")
    on_s3 = cli.json("verify")
    assert on_s3["ok"] and on_s3["checked"] == n and on_s3["stored_objects"] == n
    assert cli.json("stats")["instances"] == n
    s3 = open_store(s3_bucket_url, S3_ACCESS, S3_SECRET)
    try:
        assert {info.key: s3.checksum(info.key) for info in s3.list()} == shas
    finally:
        s3.close()

    back_url = f"file://{tmp_path / 'objects-back'}"
    back = cli.json("migrate", "--to", back_url, "--switch")
    assert back["copied"] == n and back["switched"]
    assert tomllib.loads((archive / "pacs.toml").read_text())["storage_url"] == back_url
    assert cli.json("verify")["ok"]
    fs = FileStore(tmp_path / "objects-back")
    assert {info.key: fs.checksum(info.key) for info in fs.list()} == shas
    # The source was never touched.
    old = FileStore(tmp_path / "old-objects")
    assert {info.key: old.checksum(info.key) for info in old.list()} == shas



def test_migrate_switch_waits_until_no_server_runs(archive: Path, tmp_path: Path) -> None:
    """A switch while `pacs serve` runs on the data dir left the server writing
    to the old store: what it acknowledged was missing after its restart
    (WADO-RS 500). The switch is refused then; once the server is stopped the
    same command copies what arrived meanwhile and switches. A target inside
    the current store is refused."""
    from pacs.running import hold_for_serving

    cli = Cli(archive)
    target = f"file://{tmp_path / 'moved'}"
    serving = hold_for_serving(archive)  # what a running pacs serve holds
    try:
        refused = cli.json("migrate", "--to", target, "--switch", rc=1)
    finally:
        serving.close()
    assert refused["complete"] and not refused["switched"]
    assert any("pacs serve runs on" in w for w in refused["warnings"])
    assert not (archive / "pacs.toml").exists() or "storage_url" not in (archive / "pacs.toml").read_text()
    late = tmp_path / "late"
    late.mkdir()
    _, data = _new_instance_bytes_of_ct()
    (late / "late.dcm").write_bytes(data)  # arrives after the copy
    assert cli.json("import", str(late))["stored"] == 1
    switched = cli.json("migrate", "--to", target, "--switch")
    assert switched["switched"] and switched["copied"] == 1
    assert cli.json("verify")["ok"]
    nested = cli("migrate", "--to", f"file://{tmp_path / 'moved' / 'inner'}")
    assert nested.returncode == 2 and "inside one another" in nested.stderr

def test_verify_repair_and_migrate_on_postgresql_and_s3(tmp_path: Path, pg_url: str, s3_bucket_url: str) -> None:
    cli = Cli(tmp_path / "data", index_url=pg_url, storage_url=s3_bucket_url, env=S3_ENV)
    src = tmp_path / "in"
    write_corpus(src)
    shutil.copy(pydicom_file("CT_small.dcm"), src)
    assert cli.json("import", str(src))["stored"] == 10
    store = open_store(s3_bucket_url, S3_ACCESS, S3_SECRET)
    try:
        with cli.core() as pacs:
            items = list(pacs.reader.iter_stored())
            orphan_key, orphan = _new_instance_bytes(pacs)
        store.delete(items[0].storage_key)
        store.put(orphan_key, io.BytesIO(orphan))

        found = cli.json("verify", rc=1)
        assert [m["key"] for m in found["missing"]["items"]] == [items[0].storage_key]
        assert [o["key"] for o in found["orphans"]["items"]] == [orphan_key]
        repaired = cli.json("verify", "--repair", "--drop-missing")
        assert repaired["adopted"]["count"] == 1 and repaired["dropped"]["instances"] == 1
        assert repaired["ok"]
    finally:
        store.close()

    target = f"file://{tmp_path / 'fs-objects'}"
    moved = cli.json("migrate", "--to", target)
    assert moved["complete"] and moved["copied"] == 10 and moved["failed"]["count"] == 0
    on_fs = Cli(tmp_path / "data", index_url=pg_url, storage_url=target, env=S3_ENV).json("verify")
    assert on_fs["ok"] and on_fs["checked"] == 10 and on_fs["stored_objects"] == 10


# -- purge ------------------------------------------------------------------------------
def test_purge_dry_run_changes_nothing_and_yes_deletes_exactly_the_selection(archive: Path) -> None:
    from pacs import audit
    from pacs.maintenance import storage_report

    cli = Cli(archive)
    now = datetime.now(UTC)
    with cli.core() as pacs:
        before = pacs.reader.stats()
        report = storage_report(pacs)
        with pacs.engine.begin() as conn:
            rows = conn.execute(select(Study.pk, Study.study_uid, Study.study_date, Study.modalities,
                                       Study.num_instances, Study.size_bytes)).all()
            s6 = next(r.pk for r in rows if r.study_uid == study_uid("S6"))
            conn.execute(insert(Report.__table__).values(study_pk=s6, version=1, status="signed", findings="ok",
                                                         created_at=now, updated_at=now))
        keys = {i.storage_key: i.study_uid for i in pacs.reader.iter_stored()}
    # The storage report (for `pacs stats`) adds up to the archive.
    assert sum(m["bytes"] for m in report["bytes_per_modality"].values()) == before.bytes
    assert report["bytes_per_month"]["2024-01"]["studies"] == 2  # S1 and S5
    assert report["free_bytes"] > 0 and "outbox" in report["queues"]

    days = (date.today() - date(2024, 2, 1)).days  # study dates before 2024-02-01
    selected = {r.study_uid for r in rows if len(r.study_date) == 8 and r.study_date < "20240201"
                and "CT" in r.modalities.split("\\")}
    assert study_uid("S1") in selected and study_uid("S4") in selected and study_uid("S2") not in selected
    dry = cli.json("purge", "--older-than", str(days), "--modality", "CT")
    assert dry["dry_run"] and {s["study_uid"] for s in dry["studies"]["items"]} == selected
    assert dry["selected"]["instances"] == sum(r.num_instances for r in rows if r.study_uid in selected)
    assert dry["selected"]["bytes"] == sum(r.size_bytes for r in rows if r.study_uid in selected)
    unread_mr = cli.json("purge", "--status", "unread", "--modality", "MR", "--dry-run")
    unread_uids = {s["study_uid"] for s in unread_mr["studies"]["items"]}
    assert study_uid("S1") in unread_uids and study_uid("S6") not in unread_uids  # S6 has a signed report
    assert cli("purge").returncode == 2  # no rule: refuse rather than select everything
    with cli.core() as pacs:
        assert pacs.reader.stats() == before
    assert all(FileStore(archive / "objects").exists(k) for k in keys)

    done = cli.json("purge", "--older-than", str(days), "--modality", "CT", "--yes")
    deleted = done["deleted"]
    assert deleted["studies"] == len(selected) and deleted["objects"] == dry["selected"]["instances"]
    store = FileStore(archive / "objects")
    for key, study in keys.items():
        assert store.exists(key) == (study not in selected), key
    with cli.core() as pacs:
        after = pacs.reader.stats()
        events = audit.query(pacs.engine, action="delete")
    assert after.studies == before.studies - len(selected)
    assert after.instances == before.instances - dry["selected"]["instances"]
    assert after.bytes == before.bytes - dry["selected"]["bytes"]
    assert {e["study_uid"] for e in events} == selected
    assert all(e["protocol"] == "cli" and e["user"] and e["patient_id"] for e in events)
    assert cli.json("verify")["ok"]  # no orphan object, no row without its object


# -- compress ---------------------------------------------------------------------------
@pytest.mark.parametrize(("codec", "syntax"), [("jpeg-ls", JPEGLSLossless), ("j2k", JPEG2000Lossless)])
def test_compress_is_lossless_and_smaller(archive: Path, codec: str, syntax: str, tmp_path: Path) -> None:
    from pacs.ingest import Origin
    from pacs.maintenance import verify

    cli = Cli(archive)
    store = FileStore(archive / "objects")
    originals: dict[str, tuple[str, int, np.ndarray]] = {}
    with cli.core() as pacs:
        for item in pacs.reader.iter_stored():
            ds = dcmread(io.BytesIO(store.read_bytes(item.storage_key)))
            if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
                originals[item.sop_uid] = (item.storage_key, item.size, ds.pixel_array.copy())
    liver = dcmread(pydicom_file("liver.dcm"), stop_before_pixels=True).SOPInstanceUID

    report = cli.json("compress", "--codec", codec)
    assert report["candidates"] == len(originals)
    assert report["compressed"] == len(originals) - 1  # all but the 1-bit segmentation
    assert [s["sop_uid"] for s in report["skipped"]["not encodable"]["items"]] == [liver]
    assert report["bytes_saved"] > 0 and report["failed"]["count"] == 0

    variant = {"jpeg-ls": "jls", "j2k": "j2k"}[codec]
    assert report["old_objects_pending"] == len(originals) - 1 and report["old_objects_deleted"] == 0
    with cli.core() as pacs:
        for sop, (key, size, pixels) in originals.items():
            stored = pacs.reader.stored_instance(sop)
            assert stored is not None
            if sop == liver:
                assert stored.storage_key == key and stored.size == size
                continue
            # A key of its own: a server that looked the old row up before the
            # replacement still reads the object that row describes (it read
            # JPEG-LS bytes under the old size and syntax).
            assert stored.storage_key == key.removesuffix(".dcm") + f".{variant}.dcm"
            assert len(store.read_bytes(key)) == size
            assert not dcmread(io.BytesIO(store.read_bytes(key))).file_meta.TransferSyntaxUID.is_compressed
            assert stored.transfer_syntax_uid == syntax and stored.size < size
            ds = dcmread(io.BytesIO(store.read_bytes(stored.storage_key)))
            assert ds.SOPInstanceUID == sop and ds.file_meta.TransferSyntaxUID == syntax
            decoded = ds.pixel_array
            assert decoded.dtype == pixels.dtype and np.array_equal(decoded, pixels)
        checked = verify(pacs)
        assert checked.problems == 0  # sizes and checksums in the index follow
        assert checked.pending_purge == len(originals) - 1  # the old copies: no orphans
        # The modality sends a compressed instance again: a resend (kept, 0000H), not
        # another object under a kept UID (0111H), though the kept copy's key differs.
        sop, (key, _size, _pixels) = next((s, o) for s, o in originals.items() if s != liver)
        (tmp_path / "resent.dcm").write_bytes(store.read_bytes(key))
        resent = pacs.ingest_file(tmp_path / "resent.dcm", Origin(source="test", calling_ae="CT1", remote_host=""))
        assert resent.storage_key.endswith(f".{variant}.dcm") and resent.conflict is None
    again = cli.json("compress", "--codec", codec)
    assert again["candidates"] == 1 and again["compressed"] == 0
    # The old copies stay for readers 10 minutes, even for verify --repair, and are never adopted back...
    repaired = cli.json("verify", "--repair")
    assert repaired["problems"] == 0 and repaired["adopted"]["count"] == 0, repaired
    assert all(store.exists(key) for key, _size, _pixels in originals.values())
    # ... then go: pacs serve's sweep once the tombstones are 11 minutes old (or verify --repair, purge --yes).
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from pacs.index.tombstones import tombstones_t
    from pacs.sweeper import Sweeper
    with cli.core() as pacs:
        assert Sweeper(pacs).sweep() == 0
        with pacs.engine.begin() as conn:
            conn.execute(update(tombstones_t).values(created_at=datetime.now(UTC) - timedelta(minutes=11)))
        assert Sweeper(pacs).sweep() == len(originals) - 1
    assert cli.json("verify")["problems"] == 0
    for sop, (key, _size, _pixels) in originals.items():
        assert store.exists(key) == (sop == liver)
    with cli.core() as pacs:
        assert verify(pacs).problems == 0


def test_compress_never_overrides_a_resend_or_a_deletion_made_while_it_encoded(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While compress encodes an image, a modality sends it again (overwrite
    policy: acknowledged, replaced) or an admin deletes its study. The
    encoding was made from the old row: written over, it replaced the
    acknowledged resend with the old content, and brought the deleted
    instance (with its patient, study and series) back."""
    from pacs.index.committer import GroupCommitter
    from pacs.index.writer import IndexWriter
    from pacs.ingest import Ingestor, Origin
    import importlib

    from pacs.maintenance import delete as deletion

    compress_module = importlib.import_module("pacs.maintenance.compress")
    compress = compress_module.compress
    from pacs.part10 import FileSource

    cli = Cli(archive)
    store = FileStore(archive / "objects")
    with cli.core() as pacs:
        candidates = [i for i in pacs.reader.iter_stored()
                      if i.transfer_syntax_uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")]
        by_study: dict[str, list[Any]] = {}
        for item in candidates:
            by_study.setdefault(item.study_uid, []).append(item)
        single = [items[0] for items in by_study.values() if len(items) == 1]
        resent, deleted = single[0], single[1]
        changed = dcmread(io.BytesIO(store.read_bytes(resent.storage_key)))
        changed.ImageComments = "sent again, acknowledged"
        changed.save_as(tmp_path / "resend.dcm", enforce_file_format=True)
        overwriting = Ingestor(pacs.store, GroupCommitter(pacs.engine, IndexWriter(overwrite=True)), pacs.reader,
                               overwrite=True)
        real_encode = compress_module._encode
        done: list[str] = []

        def encode_meanwhile(src: Path, target: Any, tmp_dir: Path) -> Any:
            encoded = real_encode(src, target, tmp_dir)
            sop = dcmread(src, stop_before_pixels=True).SOPInstanceUID
            if sop == resent.sop_uid:
                overwriting.ingest(FileSource(tmp_path / "resend.dcm"), Origin(source="test", calling_ae="CT1"))
                done.append("resent")
            elif sop == deleted.sop_uid:
                deletion.delete_target(pacs, deletion.Target(deleted.study_uid), reason="gửi nhầm", user="tester")
                done.append("deleted")
            return encoded

        monkeypatch.setattr(compress_module, "_encode", encode_meanwhile)
        report = compress(pacs, study_uids=[resent.study_uid, deleted.study_uid])
        assert sorted(done) == ["deleted", "resent"]
        assert report.skipped["changed meanwhile"].count == 2 and report.compressed == 0
        kept = pacs.reader.stored_instance(resent.sop_uid)
        # Written beside the copy it replaced (see pacs.ingest), which goes
        # after its readers' grace (test_review_resend).
        assert kept is not None and kept.storage_key == resent.storage_key.replace(".dcm", ".resent.dcm")
        assert resent.storage_key in tombstones.active_keys(pacs.engine)
        assert b"sent again, acknowledged" in store.read_bytes(kept.storage_key)
        assert pacs.reader.stored_instance(deleted.sop_uid) is None
        with pacs.engine.connect() as conn:
            from sqlalchemy import select

            from pacs.index.models import Study
            assert conn.execute(select(Study.pk).where(Study.study_uid == deleted.study_uid)).first() is None
        assert not [info.key for info in store.list() if info.key.endswith(".jls.dcm")]


def test_index_restored_from_before_compress_is_repaired_onto_the_compressed_objects(
        archive: Path, tmp_path: Path) -> None:
    """The backup's rows name <sop>.dcm, which compress replaced by
    <sop>.jls.dcm and deleted. verify --repair ingested each orphan under the
    row's key: JPEG-LS bytes under a row still saying Explicit VR LE and the
    old size (then "corrupt"). Now the row is pointed at the orphan."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from pacs.index.tombstones import tombstones_t
    from pacs.sweeper import Sweeper

    cli = Cli(archive)
    cli.json("backup", "--out", str(tmp_path / "index.bak"))
    compressed = cli.json("compress", "--codec", "jpeg-ls")["compressed"]
    assert compressed > 0
    with cli.core() as pacs:
        with pacs.engine.begin() as conn:
            conn.execute(update(tombstones_t).values(created_at=datetime.now(UTC) - timedelta(minutes=11)))
        assert Sweeper(pacs).sweep() == compressed
    assert cli("restore", str(tmp_path / "index.bak"), "--yes").returncode == 0
    before = cli.json("verify", rc=1)
    assert before["missing"]["count"] == compressed and before["orphans"]["count"] == compressed

    repaired = cli.json("verify", "--repair")
    assert repaired["repointed"] == compressed and repaired["problems"] == 0, repaired
    assert cli.json("verify")["problems"] == 0
    store = FileStore(archive / "objects")
    with cli.core() as pacs:
        moved = [i for i in pacs.reader.iter_stored() if i.storage_key.endswith(".jls.dcm")]
        assert len(moved) == compressed
        for item in moved:
            assert item.transfer_syntax_uid == JPEGLSLossless
            assert len(store.read_bytes(item.storage_key)) == item.size


# -- export -----------------------------------------------------------------------------
def test_export_plain_and_deidentified(archive: Path, tmp_path: Path) -> None:
    from pacs import audit

    cli = Cli(archive)
    s1, s2 = study_uid("S1"), study_uid("S2")  # two studies of one patient
    with cli.core() as pacs:
        items = [i for s in (s1, s2) for i in pacs.reader.iter_stored(s)]
    store = FileStore(archive / "objects")

    plain = cli.json("export", s1, s2, "--out", str(tmp_path / "plain"))
    assert plain["studies"] == 2 and plain["instances"] == len(items) == 4
    for item in items:
        written = tmp_path / "plain" / item.study_uid / item.series_uid / f"{item.sop_uid}.dcm"
        assert _sha(written.read_bytes()) == item.sha256  # exactly as stored
    assert cli.json("export", s1, s2, "--out", str(tmp_path / "plain"))["already_there"] == 4

    deid = cli.json("export", s1, s2, "--out", str(tmp_path / "deid.zip"), "--deidentify", "--salt", "research-1")
    assert deid["deidentified"] and deid["instances"] == 4
    originals = {i.sop_uid: dcmread(io.BytesIO(store.read_bytes(i.storage_key))) for i in items}
    original_uids = {u for ds in originals.values() for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                               ds.SOPInstanceUID)}
    with zipfile.ZipFile(tmp_path / "deid.zip") as zf:
        names = sorted(zf.namelist())
        exported = [dcmread(io.BytesIO(zf.read(name))) for name in names]
    assert len(exported) == 4
    for name, ds in zip(names, exported, strict=True):
        assert name == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}.isdisjoint(original_uids)
        assert ds.PatientIdentityRemoved == "YES" and "AccessionNumber" not in ds or not ds.AccessionNumber
        assert "Nguyễn" not in str(ds.PatientName)
    assert len({ds.PatientID for ds in exported}) == 1  # one patient, one pseudonym
    assert len({ds.StudyInstanceUID for ds in exported}) == 2
    assert sorted(ds.PixelData for ds in exported) == sorted(ds.PixelData for ds in originals.values())

    # Another export with the same salt: the same new UIDs (a research set can grow).
    cli.json("export", s1, "--out", str(tmp_path / "deid-s1"), "--deidentify", "--salt", "research-1")
    again = sorted(str(p.relative_to(tmp_path / "deid-s1")) for p in (tmp_path / "deid-s1").rglob("*.dcm"))
    assert again and set(again) <= set(names)

    missing = cli.json("export", "1.2.3.4.5", "--out", str(tmp_path / "none"), rc=1)
    assert missing["missing_studies"] == ["1.2.3.4.5"]
    with cli.core() as pacs:
        events = audit.query(pacs.engine, action="export")
    assert sorted(e["study_uid"] for e in events) == sorted([s1, s2] * 3 + [s1])
    assert all(e["protocol"] == "cli" and e["patient_id"] == "001085012345" for e in events)


def test_verify_names_stray_files_and_will_not_empty_the_index_of_an_unmounted_disk(archive: Path) -> None:
    cli = Cli(archive)
    objects = archive / "objects"
    (objects / "README.txt").write_text("copied in by hand")
    some_object = next(p for p in objects.rglob("*.dcm"))
    (some_object.parent / "copy of it.dcm").write_bytes(some_object.read_bytes())
    (objects / os.fsdecode(b"bad\xff.dcm")).write_bytes(b"x")  # a name that is not UTF-8
    report = cli.json("verify", rc=1)
    stray = {o["key"]: o for o in report["orphans"]["items"] if not o["valid"]}
    assert set(stray) == {"?README.txt", "?" + str((some_object.parent / "copy of it.dcm").relative_to(objects)),
                          "?bad\\xff.dcm"}
    assert all("not an object of this store" in o["detail"] for o in stray.values())
    repaired = cli.json("verify", "--repair", rc=1)
    assert repaired["invalid_orphans"]["count"] == 3 and (objects / "README.txt").exists()

    # The data disk not mounted: the store is an empty folder.
    shutil.move(objects, archive / "objects-elsewhere")
    with cli.core() as pacs:
        before = pacs.reader.stats().instances
    refused = cli("verify", "--repair", "--drop-missing")
    assert refused.returncode == 1 and "is the data disk mounted" in refused.stderr, refused.stderr
    with cli.core() as pacs:
        assert pacs.reader.stats().instances == before


def test_purge_keeps_a_study_whose_date_is_a_placeholder_by_when_it_arrived(archive: Path) -> None:
    from sqlalchemy import update

    cli = Cli(archive)
    with cli.core() as pacs, pacs.engine.begin() as conn:
        conn.execute(update(Study.__table__).where(Study.study_uid == study_uid("S2")).values(study_date="00000000"))
    dry = cli.json("purge", "--older-than", "30")
    assert study_uid("S2") not in {s["study_uid"] for s in dry["studies"]["items"]}  # it arrived today
