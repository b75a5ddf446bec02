"""Several DICOM worker processes on one port, so associations use every core.

pynetdicom runs an association in a thread and spends most of its time in
Python (PDU decoding, DIMSE, our ingest), so one process tops out at one core
whatever the number of modalities sending. ``pacs serve --dicom-workers N``
opens the listening socket once in the supervisor and starts N worker
processes (``python -m dicom_scp.workers``) that all accept on it:

- a shared socket rather than SO_REUSEPORT: the kernel hashes connections onto
  SO_REUSEPORT sockets, so four modalities could land 3+1 or 4+0 on two
  workers; on one shared socket the worker that is idle in its accept loop
  takes the next connection, which balances by load;
- each worker opens its own :class:`pacs.app.Pacs` (index engine, store,
  group committer) and runs exactly the handlers of the single-process server:
  ingest, C-FIND, C-MOVE, C-GET, worklist and MPPS all go through the index,
  so nothing is shared in memory between workers but the count of
  connections per peer address (:class:`PoolHostCounts`), so that
  ``max_associations_per_host`` holds for the pool;
- a worker dies with its supervisor (``PR_SET_PDEATHSIG``): a SIGKILLed
  ``pacs serve`` leaves no process answering on the port, and a crash loses
  nothing acknowledged because every worker acknowledges only after the
  object is durable and indexed, as the single process does;
- a worker that exits on its own is restarted (after a short back-off);
- ``start()`` returns once every worker is accepting (each writes a byte to
  a pipe when ready), so what starts after the pool (the HTTP port the
  operator and the tests wait for) means the DICOM side is ready too; a
  modality that connects earlier waits in the listen backlog, not refused.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacs.dicom_net import readable

from .acceptor import InlineAssociationServer

if TYPE_CHECKING:
    from pacs.settings import Settings

log = logging.getLogger("dicom_scp.workers")  # not __main__ in a worker

FD_ENV = "PACS_DICOM_LISTEN_FD"
READY_FD_ENV = "PACS_WORKER_READY_FD"
SETTINGS_ENV = "PACS_WORKER_SETTINGS"
HOSTS_FD_ENV = "PACS_DICOM_HOSTS_FD"
COUNT_ENV = "PACS_WORKER_COUNT"
_PR_SET_PDEATHSIG = 1


class SharedSocketServer(InlineAssociationServer):
    """An association server that accepts on a socket listening already.

    Subclassed per socket by :func:`shared_server_class` (pynetdicom builds
    the server from a class, not an instance).
    """

    inherited: socket.socket

    def server_bind(self) -> None:
        self.socket.close()  # the one TCPServer made for us
        self.socket = self.inherited
        # Non-blocking: when a sibling worker took the connection first,
        # accept() raises BlockingIOError and socketserver goes back to select.
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening (the supervisor called listen)."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        client.setblocking(True)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address


def shared_server_class(listener: socket.socket) -> type[SharedSocketServer]:
    """A :class:`SharedSocketServer` subclass bound to *listener*."""
    return type("SharedSocketServer", (SharedSocketServer,), {"inherited": listener})


def open_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen on (host, port); the workers inherit the socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def worker_settings(settings: Settings, workers: int, shared_hosts: bool = True) -> dict[str, Any]:
    """What a worker runs with: the supervisor's settings, its share of the
    association limit, and no workers of its own. The per-host limit is the
    pool's (the explicit setting, or half the total as for one process),
    held across the workers by :class:`PoolHostCounts`; only without that
    shared count is it split too. (Split, a host's connections landing
    unevenly on the workers were refused below the limit: 14 of 16.)"""
    data = settings.model_dump(mode="json")
    data["max_associations"] = max(1, math.ceil(settings.max_associations / workers))
    per_host = settings.max_associations_per_host or max(1, settings.max_associations // 2)
    data["max_associations_per_host"] = per_host if shared_hosts else max(1, math.ceil(per_host / workers))
    data["dicom_workers"] = 1
    return data


class PoolHostCounts:
    """Open connections per peer address of each worker of the pool, in
    memory the workers share (a memfd the supervisor makes, one row per
    worker, one cell per bucket of addresses): ``max_associations_per_host``
    then holds for the pool as for one process, whichever worker the
    kernel hands a connection to. A worker writes only its own row and
    reads the others'; a restarted worker clears its row (the connections
    of the one it replaces died with it). Two addresses sharing a bucket
    share what other workers hold of them: rare with 16384 buckets."""

    BUCKETS = 16384
    _CELL = 4  # bytes of an unsigned count

    def __init__(self, fd: int, workers: int, number: int) -> None:
        self.workers, self.number = workers, number
        self._map = mmap.mmap(fd, self.size(workers))
        row = number * self.BUCKETS * self._CELL
        self._map[row:row + self.BUCKETS * self._CELL] = bytes(self.BUCKETS * self._CELL)
        self._cells = memoryview(self._map).cast("I")

    @classmethod
    def size(cls, workers: int) -> int:
        return workers * cls.BUCKETS * cls._CELL

    @classmethod
    def make(cls, workers: int) -> int | None:
        """The shared memory for *workers* (a file descriptor to hand them),
        or None where memfd_create is missing (not Linux)."""
        try:
            fd = os.memfd_create("pacs-dicom-hosts")
        except (AttributeError, OSError) as exc:
            log.warning("per-host association counts not shared by the DICOM workers (%s): "
                        "each holds its share of max_associations_per_host", exc)
            return None
        os.ftruncate(fd, cls.size(workers))
        return fd

    @classmethod
    def from_env(cls) -> PoolHostCounts | None:
        """A worker's view of the pool's counts, when the supervisor made them."""
        fd = os.environ.get(HOSTS_FD_ENV)
        if fd is None:
            return None
        return cls(int(fd), int(os.environ[COUNT_ENV]), int(os.environ["PACS_WORKER_NUMBER"]))

    def bucket(self, address: str) -> int:
        return zlib.crc32(address.encode()) % self.BUCKETS

    def elsewhere(self, address: str) -> int:
        """Connections from *address* the other workers hold."""
        b = self.bucket(address)
        return sum(self._cells[w * self.BUCKETS + b] for w in range(self.workers) if w != self.number)

    def publish(self, bucket: int, count: int) -> None:
        """This worker holds *count* connections from the addresses of *bucket*."""
        self._cells[self.number * self.BUCKETS + bucket] = count


class PoolConnections:
    """The supervisor's read-only view of :class:`PoolHostCounts`: how many
    connections the whole pool holds (/metrics: this node's open
    associations, whichever worker took them)."""

    def __init__(self, fd: int, workers: int) -> None:
        self._map = mmap.mmap(fd, PoolHostCounts.size(workers), access=mmap.ACCESS_READ)

    def total(self) -> int:
        # A copy (128 KB for two workers): a view kept on the map would stop close().
        return sum(memoryview(self._map[:]).cast("I"))

    def close(self) -> None:
        self._map.close()


@dataclass
class WorkerPool:
    """Starts, watches and stops the DICOM worker processes."""

    settings: Settings
    listener: socket.socket
    count: int
    restart_delay: float = 2.0
    ready_timeout: float = 60.0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _hosts_fd: int | None = None
    _watcher: threading.Thread | None = None
    _stop_timeout: float = 30.0
    _connections: PoolConnections | None = None

    def start(self) -> WorkerPool:
        """Start the workers from this (long-lived) thread and the watcher;
        return once each is accepting (or has failed, which is logged and
        left to the watcher to restart)."""
        self._hosts_fd = PoolHostCounts.make(self.count)
        if self._hosts_fd is not None:
            self._connections = PoolConnections(self._hosts_fd, self.count)
        spawned = [self._spawn(i, ready=True) for i in range(self.count)]
        self.procs = [proc for proc, _ in spawned]
        self._await_ready([pipe for _, pipe in spawned])
        self._watcher = threading.Thread(target=self._watch, name="dicom-workers", daemon=True)
        self._watcher.start()
        host, port = self.listener.getsockname()[:2]
        log.info("DICOM listening on %s:%d as %s (%d worker processes)", host, port, self.settings.ae_title,
                 self.count)
        return self

    def _spawn(self, number: int, ready: bool = False) -> tuple[subprocess.Popen[bytes], int | None]:
        fd = self.listener.fileno()
        env = dict(os.environ)
        env[FD_ENV] = str(fd)
        env[SETTINGS_ENV] = json.dumps(worker_settings(self.settings, self.count, self._hosts_fd is not None))
        env["PACS_WORKER_NUMBER"] = str(number)
        env["PACS_SUPERVISOR_PID"] = str(os.getpid())
        fds: tuple[int, ...] = (fd,)
        if self._hosts_fd is not None:
            env[HOSTS_FD_ENV], env[COUNT_ENV] = str(self._hosts_fd), str(self.count)
            fds += (self._hosts_fd,)
        read_end = write_end = None
        if ready:
            read_end, write_end = os.pipe()
            env[READY_FD_ENV] = str(write_end)
            fds += (write_end,)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "dicom_scp.workers"], pass_fds=fds, env=env)
        finally:
            if write_end is not None:
                os.close(write_end)
        return proc, read_end

    def _await_ready(self, pipes: list[int | None]) -> None:
        # A worker writes one byte once accepting; EOF without it means it
        # died first (its pipe's write end closed with it).
        deadline = time.monotonic() + self.ready_timeout
        for number, pipe in enumerate(pipes):
            if pipe is None:
                continue
            try:
                if not readable([pipe], max(0.0, deadline - time.monotonic())):
                    log.warning("DICOM worker %d not ready after %.0f s", number, self.ready_timeout)
                elif not os.read(pipe, 1):
                    log.error("DICOM worker %d exited while starting", number)
            finally:
                os.close(pipe)

    def _watch(self) -> None:
        # Also the thread that respawns: PR_SET_PDEATHSIG fires when the
        # *thread* that forked a child ends. So this thread also stops the
        # workers, and ends only once they have: the restarted ones, its
        # children, were SIGKILLed when it returned before the SIGTERM.
        while not self._stopping.wait(0.5):
            for number, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None or self._stopping.is_set():
                    continue
                log.error("DICOM worker %d (pid %d) exited with %s; restarting it", number, proc.pid, code)
                if self._stopping.wait(self.restart_delay):
                    break
                self.procs[number] = self._spawn(number)[0]
        self._terminate()

    def open_connections(self) -> int | None:
        """DICOM connections the workers hold now (None: not shared, no memfd)."""
        connections = self._connections
        return connections.total() if connections is not None else None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker (each finishes its associations), then wait;
        SIGKILL what is still running after *timeout*."""
        self._stop_timeout = timeout
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()  # it stops the workers (see _watch)
        # Nothing left to do unless the watcher died of an error.
        self._terminate()
        self.listener.close()
        if self._connections is not None:
            self._connections, connections = None, self._connections
            connections.close()
        if self._hosts_fd is not None:
            os.close(self._hosts_fd)
            self._hosts_fd = None

    def _terminate(self) -> None:
        timeout = self._stop_timeout
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("DICOM worker pid %d did not stop in %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()


def _die_with_supervisor(supervisor: int) -> None:
    """Ask the kernel for SIGKILL when the supervisor goes; if it went before
    we asked, leave now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watch below still applies
        pass
    if os.getppid() != supervisor:
        os._exit(1)


def _tell_ready() -> None:
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:  # a restarted worker: nobody waits
        return
    try:
        os.write(int(fd), b"r")
    finally:
        os.close(int(fd))


def worker_main() -> int:
    """Entry point of one worker process (started by :class:`WorkerPool`)."""
    _die_with_supervisor(int(os.environ["PACS_SUPERVISOR_PID"]))
    from pacs.app import Pacs, freeze_startup_heap, limit_malloc_arenas

    limit_malloc_arenas()  # inherited MALLOC_ARENA_MAX already did it; an explicit run too
    from pacs.cli import setup_logging
    from pacs.settings import Settings

    from .server import start_dicom_server

    settings = Settings(**json.loads(os.environ[SETTINGS_ENV]))
    setup_logging(settings.log_level)
    number = os.environ.get("PACS_WORKER_NUMBER", "?")
    listener = socket.socket(fileno=int(os.environ[FD_ENV]))
    stop = threading.Event()
    stopped_by: list[int] = []

    def ask_stop(signum: int, _frame: object) -> None:
        stopped_by.append(signum)
        stop.set()

    # SIGHUP too (a closing terminal signals the whole process group): its
    # default action killed the worker mid-association, audit unwritten.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, ask_stop)
    # The supervisor migrated the schema before starting us.
    pacs = Pacs.open(settings, migrate=False)
    try:
        server = start_dicom_server(pacs, listen_socket=listener, host_counts=PoolHostCounts.from_env())
        freeze_startup_heap()
        log.info("DICOM worker %s ready (pid %d)", number, os.getpid())
        _tell_ready()
        while not stop.wait(1.0):
            pass
        log.info("DICOM worker %s stopping on %s", number, signal.Signals(stopped_by[0]).name)
        server.shutdown()
    finally:
        pacs.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
