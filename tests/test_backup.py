"""Index backups (issue 8): `pacs backup` while serving, `pacs restore`, and
recovery of what arrived after the backup with `pacs verify --repair`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.peers import Backend, PacsServer, dcmtk
from tests.test_dimse_failures import make_ct


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
