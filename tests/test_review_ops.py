"""Operations review: what the one IT person meets running `pacs serve` and the
`pacs` command (stopping the service while a modality sends, settings typed
wrong, restoring a backup)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from .dicomfiles import make_ct
from .peers import PACS_COMMANDS, Backend, PacsServer, wait_until


class _Sender(threading.Thread):
    """A modality sending a long series on one association, object after
    object, until the association ends or an object is refused."""

    def __init__(self, server: PacsServer, template: Path) -> None:
        super().__init__(daemon=True)
        self.server, self.template = server, template
        self.acknowledged: list[str] = []
        self.refused: list[int] = []
        self.ended = ""

    def run(self) -> None:
        ae = AE(ae_title="CT_SLOW")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.server.dicom_port, ae_title=self.server.ae_title)
        assert assoc.is_established
        ds = dcmread(self.template)
        # Bounded: without an end from the server the test fails on what it got, it does not hang.
        for number in range(5000):
            if not assoc.is_established:
                break
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = number
            try:
                answer = assoc.send_c_store(ds)
            except RuntimeError:  # aborted between the check above and the send: the thread must still say so
                break
            status = getattr(answer, "Status", None)
            if status == 0x0000:
                self.acknowledged.append(str(ds.SOPInstanceUID))
            elif status is not None:
                self.refused.append(status)
                break
            # A slow link: the series is still coming when the service is stopped.
            threading.Event().wait(0.02)
        self.ended = "aborted" if assoc.is_aborted else "released" if assoc.is_released else "open"
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stop_while_a_modality_sends_refuses_nothing_and_leaves_no_orphan(tmp_path: Path, workers: str) -> None:
    """`systemctl stop` (SIGTERM) while a modality sends a long series: the
    index was closed under the open association, which went on receiving,
    every further object refused 0xA703 ("index committer is shut down")
    and left unindexed in the store, until the modality had sent the whole
    series. Now the association ends (A-ABORT after a short grace: the
    modality sends the rest again), no object is refused, every one
    acknowledged is indexed and the store holds nothing unindexed."""
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}),
                        extra_env={"PACS_DICOM_WORKERS": workers}).start()
    study = generate_uid()
    sender = _Sender(server, make_ct(tmp_path / "ct.dcm", StudyInstanceUID=study, SeriesInstanceUID=generate_uid()))
    try:
        sender.start()
        wait_until(lambda: len(sender.acknowledged) >= 20 or not sender.is_alive(), timeout=120)
        assert sender.is_alive(), (sender.refused, sender.ended)
        server.stop(signal.SIGTERM)
        sender.join(300)
    finally:
        server.stop(signal.SIGKILL)
    assert not sender.is_alive()
    assert server.proc is not None and server.proc.returncode == 0, server.log_text()[-3000:]
    assert sender.refused == [], (sender.refused, server.log_text()[-3000:])
    assert sender.ended == "aborted"
    core = server.core()
    try:
        missing = [uid for uid in sender.acknowledged if core.reader.stored_instance(uid) is None]
    finally:
        core.close()
    assert missing == []
    verify = json.loads(server.cli("verify", "--json", check=False).stdout)
    assert verify["orphans"]["count"] == 0 and verify["ok"], verify


def test_postgresql_restore_of_a_backup_taken_before_an_upgrade(tmp_path: Path, pg_empty_url: str) -> None:
    """The README's upgrade: back up with the version you leave, upgrade,
    and restore that backup if needed. `pg_restore --clean` dropped only what
    the backup holds: the constraints later migrations hung on its tables
    stopped it ("cannot drop constraint pk_patients ... other objects depend
    on it"), exit 1. Now the index is emptied first and the backup restored
    (then upgraded); a restore that fails puts the index back as it was."""
    from pacs.index import create_index_engine, current_revision, upgrade_schema
    from pacs.index.db import SCHEMA_HEAD

    engine = create_index_engine(pg_empty_url, pool_size=0)
    try:
        upgrade_schema(engine, "0012")
    finally:
        engine.dispose()
    node = PacsServer(tmp_path / "data", Backend("pg", pg_empty_url, None, {}))
    old = tmp_path / "before-upgrade.dump"
    node.cli("backup", "--out", str(old))
    node.cli("db", "upgrade")
    (tmp_path / "in").mkdir()
    node.cli("import", str(make_ct(tmp_path / "in" / "ct.dcm", StudyInstanceUID=generate_uid())))
    assert node.stats()["instances"] == 1

    restored = node.cli("restore", str(old), "--yes", check=False)
    assert restored.returncode == 0, restored.stderr
    engine = create_index_engine(pg_empty_url, pool_size=0)
    try:
        assert current_revision(engine) == SCHEMA_HEAD
    finally:
        engine.dispose()
    assert node.stats()["instances"] == 0  # the backup's index: the object stored since is an orphan
    node.cli("verify", "--repair")
    assert node.stats()["instances"] == 1
    assert '"action": "restore"' in node.cli("audit", "--format", "json").stdout

    # A damaged backup: refused by pg_restore, the index is left as it was.
    damaged = tmp_path / "damaged.dump"
    damaged.write_bytes(old.read_bytes()[: old.stat().st_size // 2])
    failed = node.cli("restore", str(damaged), "--yes", check=False)
    assert failed.returncode == 1 and "back as it was before" in failed.stderr, failed.stderr
    assert node.stats()["instances"] == 1


def _pacs(*args: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    return PACS_COMMANDS.run([*args, "--data-dir", str(data_dir)], {**clean, "PACS_ENV_FILE": "", **env}, timeout=300)


def test_wrong_settings_name_the_setting_and_the_value(tmp_path: Path) -> None:
    """A wrong value in the service's settings file or the config file: the
    message named the field only ("dicom_port ... unable to parse string as
    an integer"), and the value given vanished (rich took pydantic's
    "[type=..., input_value='abc']" for markup); a TOML error named no file;
    file://srv/objects (two slashes) stored the objects under /objects,
    creating it; a mistyped index URL scheme ended in "No module named
    'MySQLdb'"."""
    data = tmp_path / "data"
    (tmp_path / "in").mkdir()
    make_ct(tmp_path / "in" / "ct.dcm")
    assert _pacs("import", str(tmp_path / "in"), data_dir=data).returncode == 0

    port = _pacs("stats", data_dir=data, PACS_DICOM_PORT="11112x")
    assert port.returncode == 1 and "Traceback" not in port.stderr
    assert "PACS_DICOM_PORT" in port.stderr and "'11112x'" in port.stderr, port.stderr

    config = tmp_path / "pacs.toml"
    config.write_text("ae_allowlist = yes\n")
    toml = _pacs("stats", "--config", str(config), data_dir=data)
    assert toml.returncode == 1 and f"config file {config}" in toml.stderr, toml.stderr

    index = _pacs("stats", "--index-url", "mysql://pacs@db/pacs", data_dir=data)
    assert index.returncode == 1 and "--index-url, PACS_INDEX_URL" in index.stderr, index.stderr
    assert "not an index database" in index.stderr and "MySQLdb" not in index.stderr

    # file://tmp/... names the host "tmp" and the folder /pytest-of-...: never written.
    wrong = Path("/" + str(tmp_path / "objects").removeprefix("/tmp/"))
    assert str(wrong).count("/") > 2 and not wrong.exists()
    try:
        two_slashes = f"file:/{tmp_path / 'objects'}"
        imported = _pacs("import", str(tmp_path / "in"), "--storage-url", two_slashes, data_dir=tmp_path / "other")
        assert imported.returncode == 1 and f"file://{tmp_path / 'objects'}" in imported.stderr, imported.stderr
        assert not wrong.exists()
        moved = _pacs("migrate", "--to", two_slashes, data_dir=data)
        assert moved.returncode == 2 and "three slashes" in moved.stderr, moved.stderr
        assert not wrong.exists()
    finally:
        if wrong.exists():  # what the bug made at the root of the file system goes again
            shutil.rmtree(wrong)
            for parent in wrong.parents:
                if parent != Path("/") and not any(parent.iterdir()):
                    parent.rmdir()


def test_the_install_scripts_build_the_package_with_setuptools_after_february_2027() -> None:
    """`bash scripts/quickstart.sh` (pip install -e) printed setuptools'
    deprecation of ``license = { text = ... }``: "By 2027-Feb-18, you need
    to update your project ... or your builds will no longer be supported".
    After that day the quickstart and install-service.sh would stop on a
    fresh machine. The license is an SPDX expression (setuptools >= 77)."""
    import tomllib

    from .peers import ROOT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
    requires = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert requires and int(requires[0].split(">=")[1].split(".")[0]) >= 77, requires
