"""Index backups (issue 8): `pacs backup` while serving, `pacs restore`, and
recovery of what arrived after the backup with `pacs verify --repair`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.dicomfiles import make_ct
from tests.peers import Backend, PacsServer, dcmtk


def _series(tmp_path: Path, name: str, count: int) -> list[Path]:
    folder = tmp_path / name
    folder.mkdir()
    return [make_ct(folder / f"{i}.dcm", StudyInstanceUID=f"1.2.826.0.1.3680043.9.7136.{abs(hash(name)) % 10**6}",
                    InstanceNumber=i) for i in range(count)]


def _counts(stats: dict) -> tuple[int, int, int, int, int]:
    return stats["patients"], stats["studies"], stats["series"], stats["instances"], stats["bytes"]


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_backup_while_serving_then_restore_and_repair(tmp_path: Path, kind: str, request) -> None:
    index_url = request.getfixturevalue("pg_url") if kind == "pg" else None
    server = PacsServer(tmp_path / "data", Backend(kind, index_url, None, {})).start()
    backup = tmp_path / "backups" / f"index.{kind}"
    backup.parent.mkdir()  # pacs backup does not create it (an unmounted share would be written locally)
    try:
        assert server.storescu(*map(str, _series(tmp_path, "before", 5))).returncode == 0
        # A backup taken while a modality is sending is consistent (it opens and migrates).
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
             *map(str, _series(tmp_path, "during", 30))])
        result = json.loads(server.cli("backup", "--out", str(backup), "--json").stdout)
        assert sender.wait(120) == 0
        assert result["kind"] == ("sqlite" if kind == "sqlite" else "postgresql") and result["bytes"] > 0
        assert backup.is_file() and not backup.with_name(backup.name + ".partial").exists()
        assert server.storescu(*map(str, _series(tmp_path, "after", 4))).returncode == 0
        full = server.stats()
        assert '"action": "backup"' in server.cli("audit").stdout
    finally:
        server.stop()
    assert full["instances"] == 39

    # Refused without --yes; then the index goes back to the backup.
    assert server.cli("restore", str(backup), check=False).returncode == 2
    assert server.cli("restore", str(backup), "--yes", "--json").returncode == 0
    restored = server.stats()
    assert 5 <= restored["instances"] < 39
    # Objects stored since the backup are orphans in the store: verify adopts them.
    repair = server.cli("verify", "--repair", "--json", check=False)
    assert json.loads(repair.stdout)["orphans"]
    assert server.cli("verify", "--json").returncode == 0
    assert _counts(server.stats()) == _counts(full)
    assert '"action": "restore"' in server.cli("audit").stdout


def test_restore_refuses_a_file_that_is_not_a_backup(tmp_path: Path) -> None:
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    (tmp_path / "data").mkdir()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    result = server.cli("restore", str(junk), "--yes", check=False)
    assert result.returncode == 1 and "not a SQLite backup" in result.stderr


def test_restore_into_postgresql_names_a_sqlite_backup(tmp_path: Path, pg_url: str) -> None:
    """A SQLite backup restored into a PostgreSQL index failed with pg_restore's
    own "input file does not appear to be a valid archive"."""
    import sqlite3

    backup = tmp_path / "index.bak"
    sqlite3.connect(backup).execute("CREATE TABLE t (x)").connection.commit()
    server = PacsServer(tmp_path / "data", Backend("pg", pg_url, None, {}))
    (tmp_path / "data").mkdir()
    result = server.cli("restore", str(backup), "--yes", check=False)
    assert result.returncode == 1 and "is a SQLite index backup" in result.stderr, result.stderr


def test_restore_refuses_what_is_not_ours_and_keeps_the_index_it_replaces(tmp_path: Path) -> None:
    import sqlite3

    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {})).start()
    try:
        assert server.storescu(*map(str, _series(tmp_path, "kept", 3))).returncode == 0
        # Restoring under a running server would swap the index under it.
        good = tmp_path / "good.bak"
        assert server.cli("backup", "--out", str(good)).returncode == 0
        refused = server.cli("restore", str(good), "--yes", check=False)
        assert refused.returncode == 1 and "pacs serve is running" in refused.stderr
        # Nor may a backup overwrite the live index, or be a directory.
        live = server.cli("backup", "--out", str(tmp_path / "data" / "index.sqlite"), check=False)
        assert live.returncode == 1 and "live index" in live.stderr
        folder = server.cli("backup", "--out", str(tmp_path), check=False)
        assert folder.returncode == 1 and "is a directory" in folder.stderr
    finally:
        server.stop()
    assert server.stats()["instances"] == 3
    empty = tmp_path / "empty.bak"
    empty.touch()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    for not_ours in (empty, other):
        result = server.cli("restore", str(not_ours), "--yes", check=False)
        assert result.returncode == 1 and "not a backup of a filmless-pacs index" in result.stderr, result.stderr
        assert server.stats()["instances"] == 3  # untouched
    restored = server.cli("restore", str(good), "--yes")
    kept = [p for p in (tmp_path / "data").iterdir() if ".before-restore-" in p.name]
    assert len(kept) == 1 and str(kept[0]) in restored.stdout


def test_backup_of_a_large_index_ends_while_commits_go_on(tmp_path: Path) -> None:
    """SQLite restarts a stepwise backup at every commit of another connection:
    a busy server's backup never ended."""
    import sqlite3
    import threading

    from pacs.backup import backup_index

    db = tmp_path / "index.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE filler (blob BLOB)")
        conn.executemany("INSERT INTO filler VALUES (?)", [(bytes(4000),)] * 25_000)  # ~100 MB, > 6 x 4096 pages
    stop = threading.Event()
    commits = 0

    def commit_all_day() -> None:
        nonlocal commits
        with sqlite3.connect(db) as writer:
            writer.execute("PRAGMA synchronous=OFF")  # commits as fast as a busy server's, without the disk
            while not stop.is_set() and commits < 200_000:
                writer.execute("INSERT INTO filler VALUES (x'00')")
                writer.commit()
                commits += 1

    thread = threading.Thread(target=commit_all_day)
    thread.start()
    try:
        while commits < 10:
            threading.Event().wait(0.01)
        backup_index(f"sqlite:///{db}", tmp_path / "out.bak")
        still_committing = thread.is_alive()
    finally:
        stop.set()
        thread.join()
    assert still_committing, "the backup ended only when the commits did"
    with sqlite3.connect(tmp_path / "out.bak") as copy:
        assert copy.execute("SELECT count(*) FROM filler").fetchone()[0] >= 25_000


def test_postgresql_restore_refused_while_a_node_serves_and_keeps_the_database_it_replaces(
    tmp_path: Path, pg_url: str
) -> None:
    server = PacsServer(tmp_path / "data", Backend("pg", pg_url, None, {})).start()
    backup = tmp_path / "index.dump"
    try:
        assert server.storescu(*map(str, _series(tmp_path, "pg", 2))).returncode == 0
        assert server.cli("backup", "--out", str(backup)).returncode == 0
        # Another node's data dir: its lock file says nothing of this one; the database does.
        other_node = PacsServer(tmp_path / "other", Backend("pg", pg_url, None, {}))
        refused = other_node.cli("restore", str(backup), "--yes", check=False)
        assert refused.returncode == 1 and "other session" in refused.stderr, refused.stderr
    finally:
        server.stop()
    restored = server.cli("restore", str(backup), "--yes")
    kept = list((tmp_path / "data").glob("index-before-restore-*.dump"))
    assert len(kept) == 1 and kept[0].stat().st_size > 0 and str(kept[0]) in restored.stdout
    assert server.stats()["instances"] == 2


def test_restore_sets_aside_deletions_under_way_at_the_backup(tmp_path: Path) -> None:
    """A backup taken while a deletion's objects were still to delete (a
    crash, a store that refused) holds its active tombstones; the modality
    then sent the instances again and was acknowledged. After a restore,
    `verify --repair` finished those tombstones: it deleted the acknowledged
    objects. Now the restore sets them aside and verify indexes them again."""
    from storage import StorageError

    from pacs.maintenance import delete as deletion

    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    files = _series(tmp_path, "sent", 3)
    server.cli("import", *map(str, files))
    study = str(__import__("pydicom").dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    core = server.core()
    try:
        def refuse(key: str) -> None:
            raise StorageError("the store refused the delete")

        core.store.delete = refuse  # type: ignore[method-assign]
        report = deletion.delete_target(core, deletion.Target(study), reason="gửi nhầm", user="tester")
        assert report.object_failures and server.stats()["instances"] == 0
    finally:
        core.close()
    backup = tmp_path / "index.bak"
    server.cli("backup", "--out", str(backup))
    # The modality sends the study again: acknowledged (stored, indexed).
    assert json.loads(server.cli("import", *map(str, files), "--json").stdout)["stored"] == 3

    restored = server.cli("restore", str(backup), "--yes")
    assert "3 objects of deletions under way" in restored.stdout
    server.cli("verify", "--repair", "--json", check=False)
    assert server.stats()["instances"] == 3
    checked = json.loads(server.cli("verify", "--json").stdout)
    assert checked["ok"] and checked["missing"]["count"] == 0, checked


def test_postgresql_password_is_not_on_the_tools_command_line(tmp_path: Path, pg_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """pg_dump and pg_restore got the index URL with its password as an argument,
    which every local user reads in `ps` while they run; it goes in PGPASSWORD."""
    from sqlalchemy.engine import make_url

    from pacs import backup
    from pacs.app import Pacs
    from pacs.settings import Settings

    secret = "s3cr3t-Pw"
    url = make_url(pg_url).set(password=secret).render_as_string(hide_password=False)
    Pacs.open(Settings(data_dir=tmp_path / "data", index_url=url)).close()  # an index to dump
    seen = tmp_path / "seen"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        wrapper = bin_dir / tool
        # The real tool runs (trust authentication ignores the password); the wrapper records what it was given.
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $* PGPASSWORD=$PGPASSWORD" >> {seen}\n'
                           f'exec {backup._pg_tool(tool)} "$@"\n')
        wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "index.bak"
    backup.backup_index(url, out)
    backup._pg_restore(url, out)  # fails on the tables already there: only its arguments matter here
    lines = seen.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["pg_dump", "pg_restore"], lines
    for line in lines:
        arguments, _, password = line.partition(" PGPASSWORD=")
        assert secret not in arguments and password == secret, line
