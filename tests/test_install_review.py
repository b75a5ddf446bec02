"""Install and upgrade review: a mistyped settings file must not start a
second, empty archive; backup and restore of an index older than the code
succeed; a start on a taken port leaves an older index alone; bad settings
are refused before anything is created; `pacs health` follows the settings
(the image's HEALTHCHECK); a failed pip install fails the install script."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sysconfig
from pathlib import Path

import pytest

from pacs.index import create_index_engine, current_revision, upgrade_schema
from pacs.index.db import SCHEMA_HEAD

from .peers import PACS, ROOT, Backend, PacsServer, free_port, wait_port, wait_until


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    env["PACS_ENV_FILE"] = ""  # not this machine's service settings
    env["PACS_OFFER_SAMPLES"] = "false"
    env.update(extra)
    return env


def _pacs(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PACS, *args, "--data-dir", str(data_dir)], capture_output=True, text=True,
                          env=env or _env(), timeout=300)


def _serve_args(data_dir: Path, *extra: str) -> list[str]:
    return [PACS, "serve", "--data-dir", str(data_dir), "--dicom-port", str(free_port()),
            "--http-port", str(free_port()), "--hl7-port", str(free_port()), *extra]


def _old_index(data_dir: Path, revision: str = "0012") -> Path:
    """An empty SQLite index of the data dir at an older schema revision."""
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_index_engine(f"sqlite:///{data_dir}/index.sqlite")
    try:
        upgrade_schema(engine, revision)
    finally:
        engine.dispose()
    return data_dir / "index.sqlite"


def _revision(index: Path) -> str | None:
    engine = create_index_engine(f"sqlite:///{index}")
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


# -- 1. a typo in the settings file ------------------------------------------------------------
def test_serve_refuses_another_index_than_the_data_dir_records(tmp_path: Path, pg_url: str) -> None:
    """PACS_INDEX_ULR instead of PACS_INDEX_URL: serve ran on a new, empty
    SQLite index beside the recorded PostgreSQL one (studies vanished, a new
    admin password). Now refused, naming both; --new-archive is the
    deliberate change, and records it."""
    data = tmp_path / "data"
    server = PacsServer(data, Backend("pg", pg_url, None, {})).start()
    server.stop()
    recorded = json.loads((data / "archive.json").read_text())
    assert recorded["index"].startswith("postgresql://")

    typo = _env(PACS_INDEX_ULR=pg_url)
    proc = subprocess.Popen(_serve_args(data), env=typo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Without the check, serve creates the SQLite index and runs on.
        assert wait_until(lambda: proc.poll() is not None or (data / "index.sqlite").exists(), timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
    assert not (data / "index.sqlite").exists(), "a second, empty archive was started"
    assert proc.returncode == 1, stdout + stderr
    flat = " ".join(stderr.split())
    assert "refused" in flat and recorded["index"] in flat and "--new-archive" in flat, stderr
    assert "PACS_INDEX_ULR" in stderr  # the typo is named too
    assert "password" not in stdout
    assert json.loads((data / "archive.json").read_text()) == recorded

    # A deliberate new archive on this data dir.
    args = _serve_args(data, "--new-archive")
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(int(args[args.index("--http-port") + 1]), timeout=60, proc=proc)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert json.loads((data / "archive.json").read_text())["index"].startswith("sqlite:///")


# -- 2. backup and restore of an older index ---------------------------------------------------
def test_backup_and_restore_of_an_index_older_than_the_code_succeed(tmp_path: Path) -> None:
    """Backup wrote its file then exited 1 (SchemaError from its audit);
    restore replaced the index then exited 1, unaudited. Now: backup
    succeeds (its audit skipped with a note), restore upgrades the index it
    put back (no server can run meanwhile) and audits."""
    data = tmp_path / "data"
    index = _old_index(data)
    backup = tmp_path / "index.backup"

    backed_up = _pacs("backup", "--out", str(backup), data_dir=data)
    assert backed_up.returncode == 0, backed_up.stderr
    assert backup.is_file() and "backed up" in backed_up.stdout and "not audited" in backed_up.stderr
    assert _revision(index) == "0012"  # a backup never upgrades

    restored = _pacs("restore", str(backup), "--yes", data_dir=data)
    assert restored.returncode == 0, restored.stderr
    assert "kept as" in restored.stdout and "pacs verify --repair" in restored.stdout
    assert _revision(index) == SCHEMA_HEAD
    audit = _pacs("audit", "--format", "json", data_dir=data)
    assert audit.returncode == 0, audit.stderr
    assert [e for e in json.loads(audit.stdout) if e["action"] == "restore"]


# -- 3. a start that cannot listen -------------------------------------------------------------
def test_serve_on_a_taken_port_leaves_an_older_index_alone(tmp_path: Path) -> None:
    """An older server (without serve.lock) still listening: the new
    version's start failed on its port only after upgrading the index under
    that server, which then refused C-STOREs (0xA703)."""
    data = tmp_path / "data"
    index = _old_index(data)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        args = _serve_args(data)
        args[args.index("--http-port") + 1] = str(taken.getsockname()[1])  # bound last, after the others
        started = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    assert started.returncode == 1 and "already in use" in started.stdout + started.stderr, started.stderr
    assert "PACS_HTTP_PORT" in started.stdout + started.stderr
    assert _revision(index) == "0012"


# -- 4. invalid settings -----------------------------------------------------------------------
@pytest.mark.parametrize(("variable", "value", "named"), [
    ("PACS_LOG_LEVEL", "verbose", "log_level"),
    ("PACS_DICOM_PORT", "70000", "dicom_port"),
    ("PACS_HTTP_PORT", "-5", "http_port"),
    ("PACS_MAX_ASSOCIATIONS", "0", "max_associations"),
    ("PACS_TRUSTED_PROXIES", "not-an-ip", "trusted_proxies"),
    ("PACS_CORS_ORIGINS", "emr.local", "cors_origins"),
    ("PACS_HOST", "no-such-host.invalid", "PACS_HOST"),
])
def test_invalid_settings_are_refused_before_the_archive_is_made(tmp_path: Path, variable: str, value: str,
                                                                  named: str) -> None:
    data = tmp_path / "data"
    cmd = [PACS, "serve", "--data-dir", str(data)]
    if variable != "PACS_HTTP_PORT":
        cmd += ["--http-port", str(free_port())]
    if variable != "PACS_DICOM_PORT":
        cmd += ["--dicom-port", str(free_port())]
    proc = subprocess.Popen([*cmd, "--hl7-port", str(free_port())], env=_env(**{variable: value}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Accepted, serve runs on (or fails late): wait for either.
        assert wait_until(lambda: proc.poll() is not None or (data / "index.sqlite").exists(), timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stdout + stderr
    assert named in stderr, stderr
    assert not (data / "index.sqlite").exists() and "password" not in stdout


def test_valid_spellings_of_the_new_checks_are_accepted() -> None:
    from pacs.settings import Settings

    settings = Settings(log_level="debug", trusted_proxies="10.0.5.20, 10.0.6.0/24", max_associations=1,
                        cors_origins="https://emr.bvdk.vn, https://ohif.bvdk.vn/", dicom_tls_port=2762)
    assert settings.log_level == "DEBUG"
    assert Settings(trusted_proxies="*", cors_origins="*").cors_origins == "*"


# -- 5. the image's health check ---------------------------------------------------------------
def test_pacs_health_asks_where_the_settings_say(tmp_path: Path) -> None:
    """The HEALTHCHECK asked http://127.0.0.1:8042 whatever PACS_HTTP_PORT
    and PACS_HTTP_TLS said: such a container stayed unhealthy for good."""
    pki = tmp_path / "pki"
    for args in (("init-ca", "--out", str(pki / "ca")),
                 ("issue", "pacs", "--ca", str(pki / "ca"), "--out", str(pki / "server"), "--ip", "127.0.0.1")):
        made = subprocess.run([PACS, "certs", *args], capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
    tls = {"PACS_HTTP_TLS": "true", "PACS_TLS_CERT": str(pki / "server" / "pacs.pem"),
           "PACS_TLS_KEY": str(pki / "server" / "pacs.key"), "PACS_TLS_CA": str(pki / "ca" / "ca.pem")}
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env=tls)
    server.start()
    try:
        # As in the container: every setting from the environment, listening on all interfaces.
        env = _env(**tls, PACS_HTTP_PORT=str(server.http_port), PACS_HOST="0.0.0.0",
                   PACS_DATA_DIR=str(server.data_dir))
        healthy = subprocess.run([PACS, "health"], capture_output=True, text=True, env=env, timeout=60)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert f"https://127.0.0.1:{server.http_port}/health" in healthy.stdout
        plain = subprocess.run([PACS, "health"], capture_output=True, text=True, timeout=60,
                               env={**env, "PACS_HTTP_TLS": "false"})
        assert plain.returncode == 1
    finally:
        server.stop()
    down = subprocess.run([PACS, "health", "--quiet"], capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 1 and "unhealthy" in down.stderr


def test_the_image_and_compose_health_checks_run_pacs_health() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    check = next(line for line in dockerfile.splitlines() if line.startswith("HEALTHCHECK"))
    assert 'CMD ["pacs", "health"' in check and "8042" not in check
    assert "8042/health" not in (ROOT / "docker-compose.yml").read_text()


# -- 6. the install script ---------------------------------------------------------------------
def test_venv_install_fails_when_pip_fails(tmp_path: Path) -> None:
    """pip's failure was swallowed by `| grep -v ... || true`: with an older
    install still importable, install-service.sh enabled the service."""
    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # A project pip cannot build here: its build backend is not on this
    # machine and no package index may be asked (a server without network).
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=61"]\n'
                                            'build-backend = "setuptools.build_meta"\n\n'
                                            '[project]\nname = "not-installable"\nversion = "0"\n')
    script = f'source "{ROOT}/scripts/lib.sh"; ROOT="{project}"; VENV="{venv}"; venv_install ""; echo installed'
    # The appliance and pip stay importable (an earlier install): only pip's status tells.
    paths = sysconfig.get_paths()
    importable = os.pathsep.join(dict.fromkeys((str(ROOT), paths["purelib"], paths["platlib"])))
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": importable, "PIP_NO_INDEX": "1"})
    assert result.returncode == 1 and "installed" not in result.stdout, result.stdout + result.stderr
    assert "pip install" in result.stderr
