"""The peers the harness compares against: DCMTK storescp and Orthanc (with
its DICOMweb plugin), installed from the distribution's packages when missing,
each started on 127.0.0.1 with a generated config in a temp dir.

Every DCMTK-based process (storescu, storescp, findscu, movescu and Orthanc,
which is built on DCMTK) gets ``TCP_NODELAY=1`` in its environment: Debian's
DCMTK otherwise leaves Nagle's algorithm on and stalls ~40 ms per PDU.

Every process the harness starts is registered here; ``stop_all()`` (also run
at exit and on SIGTERM/SIGINT) stops whatever is still running, and
``FILMLESS_BENCH_RUN`` in every child's environment lets a test find leaks.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .common import ROOT  # noqa: F401  (puts the repo on sys.path)

from tests.peers import dcmtk, free_port, wait_port  # noqa: E402

NODELAY_NOTE = "TCP_NODELAY=1 is set in the environment of every DCMTK-based process (storescu, storescp, findscu, movescu, Orthanc)"
RUN_MARK = "FILMLESS_BENCH_RUN"
os.environ.setdefault(RUN_MARK, uuid.uuid4().hex)

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
# Debian package -> a file it provides that the harness needs.
PACKAGES = {
    "dcmtk": Path("/usr/bin/storescp"),
    "orthanc": ORTHANC,
    "orthanc-dicomweb": DICOMWEB_PLUGIN_CANDIDATES[0],
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dcmtk_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1", **(extra or {})}


# -- installation -------------------------------------------------------------------
def _installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return "install ok installed" in result.stdout


def ensure_installed(packages: list[str]) -> list[str]:
    """apt-get install the packages that are missing; returns what was installed."""
    missing = [p for p in packages if not _installed(p) or not PACKAGES.get(p, Path("/")).exists()]
    if not missing:
        return []
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"installing Debian packages: {' '.join(missing)} (apt-get install -y)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=False, env=env)
    result = subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", *missing], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"apt-get install {' '.join(missing)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    # On a systemd machine the orthanc package starts its own service on 4242/8042;
    # the harness never uses it (its Orthanc runs on free ports with its own config).
    return missing


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for package in ("dcmtk", "orthanc", "orthanc-dicomweb"):
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        out[package] = result.stdout.strip() or "missing"
    return out


def dicomweb_plugin() -> Path:
    for path in DICOMWEB_PLUGIN_CANDIDATES:
        if path.exists():
            return path
    listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout.split()
    for line in listing:
        if "DicomWeb" in line and ".so" in line:
            return Path(line)
    raise SystemExit("the Orthanc DICOMweb plugin is missing: apt-get install -y orthanc-dicomweb")


# -- the process registry -----------------------------------------------------------
_RUNNING: list[subprocess.Popen] = []


def spawn(args: list[str], *, env: dict[str, str] | None = None, log_path: Path | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start a peer in its own session (so it and its children stop together)."""
    out: Any = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(args, env=env or dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
                            cwd=cwd, start_new_session=True)
    if log_path:
        out.close()
    _RUNNING.append(proc)
    return proc


def terminate(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM the peer's session, SIGKILL if it does not stop in *timeout*."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    if proc in _RUNNING:
        _RUNNING.remove(proc)


def track(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc not in _RUNNING:
        _RUNNING.append(proc)


def untrack(proc: subprocess.Popen | None) -> None:
    if proc in _RUNNING:
        _RUNNING.remove(proc)


def stop_all() -> int:
    """Stop every registered process still running; returns how many there were."""
    left = [p for p in _RUNNING if p.poll() is None]
    for proc in list(_RUNNING):
        terminate(proc, timeout=10)
    _RUNNING.clear()
    return len(left)


def _on_signal(signum: int, _frame: Any) -> None:
    stop_all()
    raise SystemExit(128 + signum)


atexit.register(stop_all)
signal.signal(signal.SIGTERM, _on_signal)


def leftovers() -> list[str]:
    """Processes (other than this one) whose environment carries this run's mark."""
    mark = f"{RUN_MARK}={os.environ[RUN_MARK]}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name} {cmdline[:160]}")
        except OSError:
            continue
    return found


# -- memory -------------------------------------------------------------------------
def tree_rss_kb(pid: int) -> int:
    """Resident memory of *pid* and all its descendants (multi-process servers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return total


class RssSampler:
    """Samples the resident memory of a process tree every 20 ms in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        import threading

        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak_kb = tree_rss_kb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))


# -- DCMTK storescp -----------------------------------------------------------------
@dataclass
class Storescp:
    """DCMTK storescp writing into *out* (3.6.7 cannot bind one address: it
    listens on all interfaces while it runs; the harness only uses loopback)."""

    out: Path
    ae_title: str = "STORESCP"
    port: int = 0
    proc: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)

    def start(self) -> Storescp:
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.proc = spawn([dcmtk("storescp"), "-od", str(self.out), "-aet", self.ae_title, *self.extra,
                           str(self.port)], env=dcmtk_env())
        wait_port(self.port, proc=self.proc)
        return self

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def clear(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


# -- Orthanc ------------------------------------------------------------------------
@dataclass
class Orthanc:
    """Orthanc with its DICOMweb plugin on 127.0.0.1, from a generated config.

    Orthanc's defaults are kept (SQLite index, filesystem storage with fsync,
    Latin-1 answers, StorageAccessOnFind=Always) except: no compression of
    stored files, no HTTP gzip (the harness's client would otherwise pay for
    it), no authentication and no remote access (loopback only), C-FIND and
    C-MOVE allowed from any calling AE.
    """

    workdir: Path
    ae_title: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "filmless-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Host": "127.0.0.1", "Ssl": False},
        }

    def start(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self.proc = spawn([str(ORTHANC), str(self.config_path)], env=dcmtk_env(),
                          log_path=self.workdir / "orthanc.log", cwd=self.workdir)
        wait_port(self.http_port, timeout=60, proc=self.proc)
        wait_port(self.dicom_port, timeout=60, proc=self.proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http().get("/system").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer; log:\n{self.log_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def http(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=timeout)

    def log_text(self) -> str:
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def statistics(self) -> dict[str, Any]:
        with self.http() as client:
            return client.get("/statistics").json()

    def stop(self) -> None:
        terminate(self.proc, timeout=60)
        self.proc = None

    def wipe(self) -> None:
        """Stop and delete storage and index (a fresh, empty Orthanc on next start)."""
        self.stop()
        shutil.rmtree(self.workdir / "storage", ignore_errors=True)
        shutil.rmtree(self.workdir / "index", ignore_errors=True)
