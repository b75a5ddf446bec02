"""Runs `pacs` commands for the tests in processes forked from one that has
imported the CLI already.

A `pacs` process spends most of its second importing SQLAlchemy, pydicom,
pydantic and our modules; the tests run hundreds of commands. This process
imports them once, then, for each request, forks a child that is a `pacs`
process in every other way: its own environment, working directory,
arguments, standard streams (files the caller reads), exit status, atexit
handlers and non-daemon threads joined before it exits. No thread, database
connection or file is open here when it forks.

Servers (`pacs serve`) are started here too: the tests start hundreds, and
each spent a second and a half importing before it listened. Such a request
names one ``log`` file, appended to, for both streams, instead of ``out``
and ``err``.

Protocol (one JSON object per line): the caller writes
``{"id", "argv", "env", "cwd", "out", "err"}`` (or ``"log"``); this process answers
``{"id", "pid"}`` once the child runs and ``{"id", "rc"}`` when it ended
(a negative rc: killed by that signal, as subprocess reports it). It exits
when its standard input closes.
"""

from __future__ import annotations

import json
import os
import select
import sys


def _child(request: dict) -> None:
    """In the forked child: become the `pacs` command and exit with its status."""
    import atexit
    import random
    import signal
    import threading
    import time

    # As a new Python process has them (SIGPIPE stays ignored, as Python sets it).
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rc = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        if "log" in request:  # a server: both streams appended to its log, as the caller's Popen had them
            out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            err = os.dup(out)
        else:
            out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for fd, target in ((devnull, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        time.tzset()  # TZ as the command's environment has it
        random.seed()  # not the zygote's sequence in every child
        sys.argv = list(request["argv"])
        from pacs.cli import main

        try:
            rc = main(sys.argv[1:])
        except SystemExit as exc:  # argparse's errors and --help
            code = exc.code
            rc = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            rc = 1
        # What the interpreter does at exit: non-daemon threads, then atexit.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)


def _reap(running: dict[int, int]) -> None:
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        request_id = running.pop(pid, None)
        if request_id is not None:
            _answer({"id": request_id, "rc": os.waitstatus_to_exitcode(status)})


def _answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    # What the commands and servers import, imported once here.
    import importlib

    for name in ("pacs.app", "pacs.cli", "pacs.cli_maintenance", "pacs.importer", "pacs.maintenance",
                 "pacs.serve", "pacs.forwarding", "pacs.sweeper", "pacs.worklist_progress", "dicom_scp.commitment",
                 "ris_bridge.mllp", "ris_bridge.outbound", "viewer_api.app", "viewer_api.protocol"):
        importlib.import_module(name)

    running: dict[int, int] = {}
    buffer = b""
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.02)
        if ready:
            chunk = os.read(stdin, 65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _child(request)
                running[pid] = request["id"]
                _answer({"id": request["id"], "pid": pid})
        _reap(running)
    # The caller went away: the children finish on their own.


if __name__ == "__main__":
    main()
