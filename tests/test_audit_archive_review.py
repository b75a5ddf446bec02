"""Audit archive review fixes (`pacs audit-archive`).

--verify of archives made over time: an older archive's record leaves the
trail inside a newer archive, so the files given vouch for each other; the
previous_sha256 chain is walked from the trail's newest archive, and a
removed archive is named; a forged file (trailer recomputed) is told apart
from a genuine one the files given do not record. An archive run killed after
its file got its final name can be run again. SQLite and PostgreSQL.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from .conftest import PacsServer
from .peers import PACS, ROOT
from .test_audit_archive import OLD, _archive, _count, _old_events, events_t, server  # noqa: F401

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def _archive_on(server: PacsServer, day: str, before: str, folder: Path) -> dict[str, Any]:
    """`pacs audit-archive` run on *day* (libfaketime): its own record is
    then old enough for a later archive to take it along."""
    if not FAKETIME_LIB.exists():
        pytest.fail(f"libfaketime is not installed ({FAKETIME_LIB}): apt-get install -y libfaketime")
    env = {**server.env, "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": f"@{day} 10:00:00"}
    done = subprocess.run([PACS, "audit-archive", "--before", before, "--to", str(folder), "--json",
                           *server.common_args()], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _verify(server: PacsServer, *files: str) -> tuple[int, dict[str, Any]]:
    done = _archive(server, "--verify", *files, check=False)
    return done.returncode, json.loads(done.stdout)


def _forge(genuine: Path, forged: Path) -> None:
    """*genuine* with one event's user changed and the trailer recomputed."""
    lines = gzip.open(genuine, "rb").read().splitlines(keepends=True)[:-1]
    event = json.loads(lines[5])
    event["user"] = "someone.else"
    lines[5] = (json.dumps(event, ensure_ascii=False, sort_keys=True) + "\n").encode()
    trailer = {"trailer": {"events": len(lines) - 1, "sha256": hashlib.sha256(b"".join(lines)).hexdigest()}}
    with gzip.open(forged, "wb") as out:
        out.write(b"".join(lines) + (json.dumps(trailer) + "\n").encode())


def test_verify_walks_the_chain_of_archives_made_over_time(server: PacsServer, tmp_path: Path) -> None:
    _old_events(server, 24 * 90, OLD)  # 2024-01-01 .. 2024-03-30
    folder = tmp_path / "archive"
    a1 = _archive_on(server, "2024-06-01", "2024-02-01", folder)
    a2 = _archive_on(server, "2024-06-02", "2024-03-01", folder)
    # Today: takes the events of March and the records of A1 and A2 (June 2024) along.
    a3 = json.loads(_archive(server, "--before", "2024-07-01", "--to", str(folder)).stdout)
    assert a2["previous_sha256"] == a1["sha256"] and a3["previous_sha256"] == a2["sha256"]
    names = {key: Path(a["file"]).name for key, a in (("a1", a1), ("a2", a2), ("a3", a3))}

    # All three untouched: A1 and A2 are vouched for by the records inside A3 (was: FAILED, rc 1).
    rc, checked = _verify(server, a1["file"], a2["file"], a3["file"])
    assert rc == 0 and checked["ok"], checked
    assert [f["recorded_in"] for f in checked["files"]] == [names["a3"], names["a3"], "the audit trail"]
    assert checked["linked"] == 3 and checked["chain"] == []

    # A1 forged (an event changed, the trailer recomputed): told apart from the genuine one.
    forged = tmp_path / "forged.jsonl.gz"
    _forge(Path(a1["file"]), forged)
    rc, checked = _verify(server, str(forged), a2["file"], a3["file"])
    assert rc == 1 and not checked["ok"]
    problems = " ".join(checked["files"][0]["problems"])
    assert "does not match the sha256 recorded for its events" in problems and names["a1"] in problems, problems
    assert [f["ok"] for f in checked["files"]] == [False, True, True]
    assert len(checked["chain"]) == 1 and names["a1"] in checked["chain"][0], checked["chain"]

    # A2 removed: the gap is named, whichever files are given (was: rc 0 with A3 alone).
    Path(a2["file"]).unlink()
    rc, checked = _verify(server, a1["file"], a3["file"])
    assert rc == 1 and [f["ok"] for f in checked["files"]] == [True, True], checked
    assert len(checked["chain"]) == 1 and names["a2"] in checked["chain"][0], checked["chain"]
    rc, checked = _verify(server, a3["file"])
    assert rc == 1 and checked["files"][0]["ok"]
    assert [names["a1"] in checked["chain"][0], names["a2"] in checked["chain"][1]] == [True, True], checked
    # Without the newer archive that holds its record, A1 is said to need it, not to be forged.
    rc, checked = _verify(server, a1["file"])
    problems = " ".join(checked["files"][0]["problems"])
    assert rc == 1 and "recorded nowhere given" in problems and "pass every archive file" in problems, problems
    human = server.cli("audit-archive", "--verify", a1["file"], a3["file"], check=False).stdout
    assert "chain broken" in human and names["a2"] in human, human


_KILLED_BEFORE_RECORDING = """
import os, signal, sys
from pacs.cli import main
from pacs.maintenance import audit_archive

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 between naming the file and the first deletion's commit

audit_archive._delete_chunk = killed
sys.exit(main(sys.argv[1:]))
"""


def test_an_archive_run_killed_before_recording_its_file_can_run_again(server: PacsServer, tmp_path: Path) -> None:
    _old_events(server, 48, OLD)
    folder = tmp_path / "archive"
    env = {**server.env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_RECORDING, "audit-archive", "--before",
                             "2024-01-02", "--to", str(folder), "--json", *server.common_args()],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    [left] = list(folder.glob("audit-*.jsonl.gz"))
    old = events_t.c.at < datetime(2024, 1, 1, 17, tzinfo=UTC)  # 2024-01-02 00:00 in Hanoi
    assert _count(server, old) == 24 - 7  # nothing was deleted nor recorded

    again = _archive(server, "--before", "2024-01-02", "--to", str(folder), check=False)
    assert again.returncode == 0, again.stderr  # was: "... exists already", rc 1
    report = json.loads(again.stdout)
    assert report["replaced"] == str(left) == report["file"] and report["deleted"] == 24 - 7
    assert _count(server, old) == 0
    rc, checked = _verify(server, str(left))
    assert rc == 0 and checked["ok"], checked
