"""Audit retention (`pacs audit-archive`): old events move to a verified
archive file while the server runs; the trail records each archive, archives
chain by hash, a changed file is detected, and the live table stays
append-only for everyone else. SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError

from pacs.index import create_index_engine
from pacs.index.models import AuditEvent

from .conftest import PacsServer, make_backend

events_t = AuditEvent.__table__
OLD = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite-fs", "pg-fs"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PacsServer]:
    pacs = PacsServer(tmp_path / "data", make_backend(request.param, request), extra_env={"PACS_TIMEZONE": "Asia/Ho_Chi_Minh"})
    pacs.start()
    yield pacs
    pacs.stop()


def _engine(server: PacsServer) -> Any:
    return create_index_engine(server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)


def _old_events(server: PacsServer, count: int, start: datetime) -> None:
    """*count* events an hour apart from *start* (the trail of long ago)."""
    engine = _engine(server)
    try:
        with engine.begin() as conn:
            conn.execute(insert(events_t), [
                {"at": start + timedelta(hours=n), "user": "bs.an", "role": "radiologist", "client": "10.0.0.7",
                 "protocol": "http", "action": "view", "outcome": "success", "study_uid": f"1.2.3.{n}",
                 "patient_id": "001085012345", "detail": f"Nguyễn Văn An {n}"}
                for n in range(count)
            ])
    finally:
        engine.dispose()


def _count(server: PacsServer, where: Any = None) -> int:
    engine = _engine(server)
    try:
        with engine.connect() as conn:
            query = select(func.count()).select_from(events_t)
            return int(conn.execute(query.where(where) if where is not None else query).scalar())
    finally:
        engine.dispose()


def _archive(server: PacsServer, *args: str, check: bool = True) -> Any:
    return server.cli("audit-archive", *args, "--json", check=check)


def test_archive_moves_old_events_out_while_serving_and_chains(server: PacsServer, tmp_path: Path) -> None:
    _old_events(server, 1500, OLD)  # 2024-01-01 00:00 UTC .. 2024-03-03
    with server.http() as http:  # today's trail, being written meanwhile
        assert http.get("/api/worklist").status_code == 200
    recent = _count(server, events_t.c.at >= datetime(2024, 6, 1, tzinfo=UTC))
    folder = tmp_path / "archive"

    # Before 2024-02-01 in Hanoi time = 2024-01-31 17:00 UTC: 31 days x 24 h - 7 h of events.
    first = json.loads(_archive(server, "--before", "2024-02-01", "--to", str(folder)).stdout)
    assert first["events"] == first["deleted"] == 31 * 24 - 7
    assert first["previous_sha256"] is None
    path = Path(first["file"])
    assert path.parent == folder and path.name.startswith("audit-20240101-20240131-pk")
    lines = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    assert lines[0]["archive"] == "filmless-pacs audit archive 1" and lines[0]["before"] == "2024-02-01"
    assert lines[1]["detail"] == "Nguyễn Văn An 0" and lines[1]["user"] == "bs.an"
    assert lines[-1]["trailer"] == {"events": first["events"], "sha256": first["sha256"]}
    assert _count(server, events_t.c.at < datetime(2024, 1, 31, 17, tzinfo=UTC)) == 0
    assert _count(server, events_t.c.at >= datetime(2024, 1, 31, 17, tzinfo=UTC)) >= 1500 - first["events"] + recent

    # The archive is in the trail that stays; a second archive names the first's hash.
    trail = json.loads(server.cli("audit", "--format", "json", "--limit", "100000").stdout)
    recorded = [e for e in trail if e["action"] == "audit-archive"]
    assert len(recorded) == 1 and f"sha256={first['sha256']}" in recorded[0]["detail"]
    second = json.loads(_archive(server, "--before", "2024-03-01", "--to", str(folder)).stdout)
    assert second["events"] == 29 * 24 and second["previous_sha256"] == first["sha256"]
    again = json.loads(_archive(server, "--before", "2024-03-01", "--to", str(folder)).stdout)
    assert again["events"] == 0 and again["file"] is None

    # Both files check, against their content and the trail.
    checked = json.loads(_archive(server, "--verify", first["file"], second["file"]).stdout)
    assert checked["ok"] and [f["in_trail"] for f in checked["files"]] == [True, True]

    # Everyone else still meets the append-only guard.
    engine = _engine(server)
    try:
        statements = ["DELETE FROM audit_events", "UPDATE audit_events SET detail = 'x'"]
        if server.backend.index_url:  # PostgreSQL: TRUNCATE fires no row trigger (migration 0017)
            statements.append("TRUNCATE audit_events")
        for statement in statements:
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        engine.dispose()
    assert server.alive()


def test_a_changed_archive_and_bad_requests_are_refused(server: PacsServer, tmp_path: Path) -> None:
    _old_events(server, 48, OLD)
    # Too recent: events of the last day may still be on their way to the index.
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    refused = _archive(server, "--before", tomorrow, "--to", str(tmp_path / "a"), check=False)
    assert refused.returncode == 2 and "too recent" in refused.stderr
    assert _archive(server, "--before", "2024-01-02", check=False).returncode == 2  # no --to
    ancient = _archive(server, "--before", "0001-01-01", "--to", str(tmp_path / "a"), check=False)
    assert ancient.returncode == 2 and "not a date" in ancient.stderr, ancient.stderr
    assert _count(server, events_t.c.at < datetime(2024, 1, 2, tzinfo=UTC)) == 24

    made = json.loads(_archive(server, "--before", "2024-01-02", "--to", str(tmp_path / "a")).stdout)
    assert made["events"] == 24 - 7  # before 2024-01-02 00:00 in Hanoi
    original = gzip.open(made["file"], "rt", encoding="utf-8").read()
    for name, content in (("changed", original.replace("Nguyễn Văn An 3", "Nguyễn Văn An 9")),
                          ("cut", "\n".join(original.splitlines()[:-1]) + "\n")):
        forged = tmp_path / "a" / f"{name}-{Path(made['file']).name}"
        with gzip.open(forged, "wt", encoding="utf-8") as out:
            out.write(content)
        check = json.loads(_archive(server, "--verify", str(forged), check=False).stdout)
        assert not check["ok"], name
        problems = " ".join(check["files"][0]["problems"])
        assert ("does not match" in problems) if name == "changed" else ("cut short" in problems), problems
    # A copy under another name is the same archive; a consistent file the
    # trail never recorded (its trailer recomputed after a change) is not.
    copy = tmp_path / "a" / "copy.jsonl.gz"
    copy.write_bytes(Path(made["file"]).read_bytes())
    assert json.loads(_archive(server, "--verify", str(copy)).stdout)["ok"]
    lines = original.replace("Nguyễn Văn An 3", "Nguyễn Văn An 9").splitlines(keepends=True)[:-1]
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    resealed = tmp_path / "a" / "resealed.jsonl.gz"
    with gzip.open(resealed, "wt", encoding="utf-8") as out:
        out.write("".join(lines) + json.dumps({"trailer": {"events": made["events"], "sha256": digest}}) + "\n")
    check = json.loads(_archive(server, "--verify", str(resealed), check=False).stdout)
    assert not check["ok"] and check["files"][0]["in_trail"] is False


def test_archive_deletes_in_batches_and_records_above_every_archived_pk(
        server: PacsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small transactions (a serving appliance's writes wait for each);
    the archive's record is written with the first, above every archived pk
    (SQLite reuses a freed highest pk: the record took an archived event's)."""
    from pacs.maintenance import audit_archive

    _old_events(server, 250, OLD)  # every event of the table is archived, the highest pk included
    monkeypatch.setattr(audit_archive, "DELETE_BATCH", 40)
    core = server.core()
    try:
        report = audit_archive.archive_audit(core, datetime(2024, 2, 1).date(), tmp_path / "archive")
    finally:
        core.close()
    assert report.events == report.deleted == 250
    engine = _engine(server)
    try:
        with engine.connect() as conn:
            record = conn.execute(select(events_t).where(events_t.c.action == "audit-archive")).one()
    finally:
        engine.dispose()
    assert record.pk > report.last_pk and f"sha256={report.sha256}" in record.detail


def test_a_nul_in_a_request_does_not_hold_the_trail_back(server: PacsServer) -> None:
    """A %00 in a path went into the audit event: PostgreSQL refuses NUL in
    text, and the writer kept the event as if the index were down, at the
    head of every later batch: nothing more was written until a restart."""
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as anonymous:
        assert anonymous.get("/dicom-web/studies/%00/metadata").status_code == 401
        login = anonymous.post("/api/auth/login", json={"username": "bs\u0000an", "password": "x"})
        assert login.status_code == 400, login.text  # was a 500 on PostgreSQL
    with server.http() as http:
        assert http.get("/api/worklist", params={"name": "marker-after-nul"}).status_code == 200
    deadline = datetime.now(UTC) + timedelta(seconds=20)
    while True:
        engine = _engine(server)
        try:
            with engine.connect() as conn:
                details = list(conn.execute(select(events_t.c.study_uid, events_t.c.detail)).all())
        finally:
            engine.dispose()
        if any("marker-after-nul" in d for _, d in details) or datetime.now(UTC) > deadline:
            break
    assert any("marker-after-nul" in d for _, d in details), "the trail stopped after the NUL"
    assert any("\ufffd" in (u + d) for u, d in details)  # the NUL attempt is there, visibly replaced
