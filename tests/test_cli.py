"""The operator's CLI: import, stats --json, the AE registry, samples, db."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from .conftest import PACS, Backend, PacsServer, free_port
from .dicomfiles import PYDICOM_FILES, copy_files
from .peers import PACS_COMMANDS


def pacs(*args: str, data_dir: Path, fresh: bool = False) -> subprocess.CompletedProcess[str]:
    """`pacs *args --data-dir data_dir` as the tests' zygote forks it (the same
    command, a second sooner); *fresh*: a new process from the `pacs` script."""
    command = [*args, "--data-dir", str(data_dir)]
    if fresh:
        return subprocess.run([PACS, *command], capture_output=True, text=True, timeout=300)
    return PACS_COMMANDS.run(command, dict(os.environ), timeout=300)


def test_import_recursive_skips_non_dicom_and_reports(tmp_path: Path) -> None:
    src = tmp_path / "in"
    copy_files(PYDICOM_FILES[:5], src / "nested" / "deeper")
    (src / "README.txt").write_text("not dicom")
    (src / "nested" / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    os.mkfifo(src / "nested" / "pipe")  # reading it would block the import forever
    result = pacs("import", str(src), "--json", data_dir=tmp_path / "data", fresh=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"] == 8
    assert summary["stored"] == 5
    assert summary["not_dicom"] == 3
    assert summary["failed"] == 0
    again = json.loads(pacs("import", str(src), "--json", data_dir=tmp_path / "data").stdout)
    assert again["duplicates"] == 5 and again["stored"] == 0
    stats = json.loads(pacs("stats", "--json", data_dir=tmp_path / "data").stdout)
    assert {"patients", "studies", "series", "instances", "bytes"} <= set(stats)
    assert stats["bytes_per_modality"]["CT"]["bytes"] > 0 and stats["free_bytes"] > 0
    assert set(stats["queues"]) == {"outbox", "routing"}
    assert stats["instances"] == 5
    assert stats["bytes"] == summary["bytes"]


def test_import_reports_broken_files_and_exit_code(tmp_path: Path) -> None:
    src = tmp_path / "in"
    copy_files(["CT_small.dcm"], src)
    good = (src / "CT_small.dcm").read_bytes()
    (src / "cut.dcm").write_bytes(good[: len(good) // 2])
    result = pacs("import", str(src), "--json", data_dir=tmp_path / "data")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["stored"] == 1 and summary["failed"] == 1
    assert "truncated" in summary["errors"][0]["error"]


def test_import_missing_path_is_usage_error(tmp_path: Path) -> None:
    result = pacs("import", str(tmp_path / "nope"), data_dir=tmp_path / "data")
    assert result.returncode == 2
    assert "no such file" in result.stderr


def test_ae_registry(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert pacs("ae", "add", "CT_ROOM1", "--host", "10.0.0.5", "--port", "104", data_dir=d).returncode == 0
    assert pacs("ae", "add", "WS_RAD", "--host", "10.0.0.9", "--port", "11112", data_dir=d).returncode == 0
    # Re-adding updates the address, and says which one it replaced.
    readded = pacs("ae", "add", "CT_ROOM1", "--host", "10.0.0.6", "--port", "105", data_dir=d)
    assert readded.returncode == 0 and "replaced=10.0.0.5:104" in readded.stdout
    listed = json.loads(pacs("ae", "list", "--json", data_dir=d).stdout)
    assert [(a["title"], a["host"], a["port"]) for a in listed] == [("CT_ROOM1", "10.0.0.6", 105), ("WS_RAD", "10.0.0.9", 11112)]
    assert pacs("ae", "remove", "WS_RAD", data_dir=d).returncode == 0
    gone = pacs("ae", "remove", "WS_RAD", data_dir=d)
    assert gone.returncode == 1 and "no AE 'WS_RAD' is registered" in gone.stderr
    bad_host = pacs("ae", "add", "X", "--host", "bad host name!", "--port", "104", data_dir=d)
    assert bad_host.returncode == 2 and "not a host name or an IP address" in bad_host.stderr
    for host in ("fe80::1", "pacs-01.bvdk.local", "192.168.1.20"):
        assert pacs("ae", "add", "HOSTS", "--host", host, "--port", "104", data_dir=d).returncode == 0
    bad = pacs("ae", "add", "WAY_TOO_LONG_AE_TITLE_X", "--host", "h", "--port", "1", data_dir=d)
    assert bad.returncode == 2 and "invalid AE title" in bad.stderr
    assert pacs("ae", "add", "OK", "--host", "h", "--port", "70000", data_dir=d).returncode == 2


def test_settings_from_environment_and_config_file(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / "pacs.toml").write_text('[[ae]]\ntitle = "FROM_FILE"\nhost = "127.0.0.1"\nport = 4242\n'
                                 '[[ae]]\ntitle = "SAT_TLS"\nhost = "sat.local"\nport = 2762\ntls = "yes"\n'
                                 'charset = "ascii"\n'
                                 '[[ae]]\ntitle = "CT_PINNED"\nhost = "10.0.0.21"\nport = 104\n'
                                 f'services = "store, mpps"\nclient_cert = "{":".join(["AB"] * 32)}"\n')
    assert pacs("db", "upgrade", data_dir=d).returncode == 0  # the archive the listings read
    listed = {a["title"]: a for a in json.loads(pacs("ae", "list", "--json", data_dir=d).stdout)}
    assert set(listed) == {"FROM_FILE", "SAT_TLS", "CT_PINNED"}
    assert listed["SAT_TLS"]["tls"] is True and listed["FROM_FILE"]["tls"] is False
    assert listed["FROM_FILE"]["services"] == "*" and listed["FROM_FILE"]["cert_sha256"] is None
    assert listed["CT_PINNED"]["services"] == "store,mpps" and listed["CT_PINNED"]["cert_sha256"] == "ab" * 32
    assert (listed["SAT_TLS"]["charset"], listed["FROM_FILE"]["charset"]) == ("ascii", "utf-8")
    # A misspelt key or an impossible value stops the command with the key named, no trace.
    for table, key in (('port = 4242\ntsl = true', "tsl"), ("port = 0", "port"), ('port = 1\ntls = "maybe"', "tls"),
                       ('port = 1\nservices = "store,print"', "services"), ('port = 1\ncharset = "latin1"', "charset")):
        (d / "pacs.toml").write_text(f'[[ae]]\ntitle = "BAD"\nhost = "h"\n{table}\n')
        result = pacs("ae", "list", data_dir=d)
        assert result.returncode == 1 and key in result.stderr and "Traceback" not in result.stderr


def test_stats_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    server = PacsServer(tmp_path / "data", Backend("pg-fs", pg_url, None, {}))
    src = tmp_path / "in"
    copy_files(PYDICOM_FILES[:3], src)
    result = server.cli("import", str(src), "--json")
    assert json.loads(result.stdout)["stored"] == 3
    assert server.stats()["instances"] == 3
    assert json.loads(server.cli("db", "current", "--json").stdout)["revision"]


def test_samples_command_loads_synthetic_studies(tmp_path: Path) -> None:
    d = tmp_path / "data"
    result = pacs("samples", "--quick", "--json", data_dir=d)
    assert result.returncode == 0, result.stderr
    stats = json.loads(pacs("stats", "--json", data_dir=d).stdout)
    assert stats["studies"] == 4 and stats["patients"] == 3


def test_reading_commands_refuse_a_data_dir_that_holds_no_archive(tmp_path: Path) -> None:
    """A mistyped --data-dir (or an unmounted disk) is an error, not a new,
    empty archive that `pacs verify` would call healthy."""
    typo = tmp_path / "dta"
    for command in (["stats", "--json"], ["verify", "--json"], ["reindex", "--json"], ["ae", "list"],
                    ["route", "list"], ["route", "rules"], ["outbox", "list"], ["audit"], ["user", "list"],
                    ["orders", "unmatched"], ["purge", "--older-than", "10", "--yes"],
                    ["backup", "--out", str(tmp_path / "b.sqlite")], ["export", "1.2.3", "--out", str(tmp_path / "x")]):
        result = pacs(*command, data_dir=typo)
        assert result.returncode == 1, (command, result.stdout)
        assert "no archive index" in result.stderr or "no object store" in result.stderr, result.stderr
    assert not typo.exists()


def test_index_and_its_backup_are_not_world_readable(tmp_path: Path) -> None:
    """The index holds patients' names and credential hashes: owner and group
    only, like the objects (0640), whatever the umask; an old 0644 index is
    tightened when opened."""
    data = tmp_path / "data"
    src = tmp_path / "in"
    copy_files(PYDICOM_FILES[:1], src)
    assert pacs("import", str(src), data_dir=data).returncode == 0
    index = data / "index.sqlite"
    os.chmod(index, 0o644)
    (tmp_path / "b").mkdir()  # backup refuses to create its folder (an unmounted share): tests/test_cli_review.py
    assert pacs("backup", "--out", str(tmp_path / "b" / "index.bak"), data_dir=data).returncode == 0
    for path in (index, tmp_path / "b" / "index.bak"):
        assert path.stat().st_mode & 0o007 == 0, (path, oct(path.stat().st_mode))


def test_misspelt_settings_are_named(tmp_path: Path) -> None:
    """A config key that configures nothing stops the command with its name
    and the closest setting; an unknown PACS_* variable is warned about."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "pacs.toml").write_text('index_ulr = "postgresql://x@y/z"\n')
    result = pacs("ae", "list", data_dir=data)
    assert result.returncode == 1
    assert "'index_ulr' (did you mean 'index_url'?)" in result.stderr
    (data / "pacs.toml").unlink()
    assert pacs("db", "upgrade", data_dir=data).returncode == 0
    env = {**os.environ, "PACS_AE_TITEL": "X"}
    warned = subprocess.run([PACS, "ae", "list", "--data-dir", str(data)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert warned.returncode == 0, warned.stderr
    assert warned.stderr.count("'PACS_AE_TITEL' (did you mean 'PACS_AE_TITLE'?) is not a setting") == 1
    # An outbound HIS address without its port is refused at start, not after.
    no_port = subprocess.run([PACS, "ae", "list", "--data-dir", str(data)], capture_output=True, text=True,
                             env={**os.environ, "PACS_HIS_MLLP": "hisserver"}, timeout=120)
    assert no_port.returncode == 1 and "his_mllp must be host:port" in no_port.stderr


def test_a_taken_port_is_named_with_its_option(tmp_path: Path) -> None:
    """Another program on one of the four ports: serve stops with that port
    and the option that moves it, not a bare "Address already in use"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        for flag, option in (("--dicom-port", "--dicom-port / PACS_DICOM_PORT"),
                             ("--hl7-port", "--hl7-port / PACS_HL7_PORT")):
            ports = {name: str(free_port()) for name in ("--dicom-port", "--http-port", "--hl7-port")}
            ports[flag] = busy
            for workers in ("1", "2"):  # the one-process listener and the worker processes' one
                result = pacs("serve", *[x for kv in ports.items() for x in kv], "--dicom-workers", workers,
                              data_dir=tmp_path / "data")
                assert result.returncode == 1, result.stderr
                assert f"on 127.0.0.1:{busy}: the port is already in use by another program (choose another " \
                       f"with {option})" in result.stderr, result.stderr


def test_tables_and_errors_print_brackets_as_text(tmp_path: Path) -> None:
    """Values in the CLI's tables and error lines are text: a patient name or
    accession holding ``[/x]`` stopped `pacs orders unmatched` with rich's
    MarkupError, and ``[b]`` vanished from the line."""
    from pydicom import dcmread

    data, src = tmp_path / "data", tmp_path / "in"
    copy_files(PYDICOM_FILES[:1], src)
    path = next(p for p in src.rglob("*") if p.is_file())
    ds = dcmread(path)
    ds.PatientName = "NGUYEN^[/x] [b]AN"
    ds.AccessionNumber = "[red]A1"
    ds.save_as(path)
    assert pacs("import", str(src), data_dir=data).returncode == 0
    result = subprocess.run([PACS, "orders", "unmatched", "--data-dir", str(data)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    assert "NGUYEN^[/x] [b]AN" in result.stdout and "[red]A1" in result.stdout, result.stdout
    result = pacs("orders", "match", "1.2.3.4", "[/x]", data_dir=data)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
