"""HTTP security review (2026-12): what a client sends can neither stop
the audit trail nor turn a bad request into a 500 on PostgreSQL.

A real `pacs serve` on PostgreSQL (where both bugs were: an index entry
has a size limit, a text value holds no NUL) with the QR corpus; httpx as
the clients."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import Backend, PacsServer
from .qr_corpus import import_corpus, study_uid

S1 = study_uid("S1")
S2 = study_uid("S2")


@pytest.fixture(scope="module")
def pg_module_url(postgres: str) -> Iterator[str]:
    """One PostgreSQL database for the module's server."""
    from .peers import create_database, drop_database

    url = create_database(postgres)
    yield url
    drop_database(url, postgres)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pg_module_url: str) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("security_review")
    srv = PacsServer(tmp / "data", Backend("pg-fs", pg_module_url, None, {}))
    import_corpus(srv, tmp / "corpus")
    srv.start()
    srv.tokens = {role: srv.make_token(f"u-{role}", role)  # type: ignore[attr-defined]
                  for role in ("radiologist", "his")}
    yield srv
    srv.stop()


def _events(server: PacsServer, **params: Any) -> list[dict[str, Any]]:
    """The trail, newest first (GET /api/audit writes what is queued first)."""
    with server.http() as http:
        answer = http.get("/api/audit", params={"limit": 200, **params})
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def _noise(length: int) -> str:
    """UID-like characters that do not compress (PostgreSQL compresses a
    long repetitive index entry below its limit)."""
    rng = random.Random(length)
    return "1." + "".join(rng.choice("0123456789.") for _ in range(length))


def _uids(count: int) -> list[str]:
    """*count* valid UIDs of 64 characters, random digits."""
    rng = random.Random(count)
    return ["2.25." + str(rng.randrange(1, 10**58)).rjust(59, "1") for _ in range(count)]


def test_a_long_study_in_a_request_does_not_stop_the_audit_trail(server: PacsServer) -> None:
    """Anyone, without a token, could stop the audit trail for good: a
    WADO-RS path (or QIDO-RS StudyInstanceUID list) of 8,000 characters
    became the event's study_uid, which PostgreSQL's index refuses
    (ProgramLimitExceeded, taken for an outage): that event and every
    later one waited in memory, retried every 2 s, never written."""
    long_study = _noise(8000)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as anonymous:
        assert anonymous.get(f"/dicom-web/studies/{long_study}/metadata").status_code == 401
    with server.http(token=server.tokens["radiologist"]) as http:  # type: ignore[attr-defined]
        # A search for 100 studies by UID (PS3.18 8.3.4.1: a list): 6,500 characters.
        searched = ",".join(_uids(100))
        assert http.get("/dicom-web/studies", params={"StudyInstanceUID": searched}).status_code == 200
        assert http.get(f"/api/studies/{S2}").status_code == 200
    events = _events(server)
    # The read after them is in the trail, with its patient.
    read = [e for e in events if e["study_uid"] == S2 and e["action"] == "view"]
    assert read and read[0]["patient_id"] == "001085012345^^^CCCD"
    # The refused requests too, their study cut to what the index holds.
    refused = [e for e in events if e["study_uid"].startswith(long_study[:100])]
    assert [(e["action"], e["outcome"], e["user"]) for e in refused] == [("retrieve", "denied", "")]
    search = [e for e in events if e["study_uid"].startswith(searched[:64])]
    assert [(e["action"], e["outcome"]) for e in search] == [("query", "success")]
    # Cut to what the index holds, between two UIDs of the list.
    assert all(len(e["study_uid"].encode()) <= 2000 for e in refused + search)
    assert all(len(uid) == 64 for uid in search[0]["study_uid"].split(","))


NUL = "a\x00b"


@pytest.mark.parametrize(("role", "path", "body"), [
    # The HIS's order API: a NUL in any value (a C string's end sent as data).
    ("his", "/api/orders", {"patient": {"id": "NUL1" + NUL, "name": "Test^Nul"}, "accession_number": "NUL-1",
                            "modality": "CT"}),
    ("his", "/api/orders", {"patient": {"id": "NUL2", "name": NUL}, "accession_number": "NUL-2", "modality": "CT"}),
    ("his", "/api/orders", {"patient": {"id": "NUL3", "name": "Test^Nul", "other_ids": [{"value": NUL}]},
                            "accession_number": "NUL-3", "modality": "CT"}),
    ("his", "/api/orders", {"patient": {"id": "NUL4", "name": "Test^Nul"}, "accession_number": "NUL-4",
                            "modality": "CT", "steps": [{"step_id": "1", "step_description": NUL}]}),
    ("admin", f"/api/studies/{S1}/match", {"accession_number": NUL}),
    ("admin", "/api/users", {"username": "nul-user", "role": "radiologist", "display_name": NUL}),
    ("admin", "/api/users", {"username": "nul" + NUL, "role": "radiologist"}),
    ("admin", "/api/tokens", {"username": "u-his", "name": NUL}),
])
def test_a_nul_in_a_json_body_is_a_400(server: PacsServer, role: str, path: str, body: dict[str, Any]) -> None:
    """PostgreSQL holds no NUL in text: a JSON value with one reached the
    index and the client got a 500 (a HIS retries a 500 forever); the path
    and query of /api were checked already, the bodies were not."""
    token = server.token if role == "admin" else server.tokens[role]  # type: ignore[attr-defined]
    with server.http(token=token) as http:
        answer = http.post(path, json=body)
    assert answer.status_code == 400, answer.text
    assert "U+0000" in answer.json()["error"]


@pytest.mark.parametrize(("role", "path", "body"), [
    ("his", "/api/orders", b'{"patient": {"id": "SUR1", "name": "Test^\\ud800"}, "accession_number": "SUR-1", '
                           b'"modality": "CT"}'),
    ("his", "/api/orders", b'{"patient": {"id": "SUR2", "name": "Test^Sur"}, "accession_number": "SUR-2", '
                           b'"modality": "CT", "reason": "\\udc00"}'),
    ("admin", "/api/users", b'{"username": "sur-user", "role": "radiologist", "display_name": "\\ud800"}'),
    ("admin", "/api/users", b'{"username": "sur-user2", "role": "radiologist", "password": "\\ud800-password"}'),
])
def test_a_lone_surrogate_in_a_json_body_is_a_400(server: PacsServer, role: str, path: str, body: bytes) -> None:
    """JSON can write "\\ud800", which is no character: Python's JSON reader
    keeps it, pydantic refuses it only in a field with a length limit, and
    the database driver then failed to encode it (a 500)."""
    token = server.token if role == "admin" else server.tokens[role]  # type: ignore[attr-defined]
    with server.http(token=token) as http:
        answer = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert "surrogate" in answer.json()["error"]


def test_a_refused_request_is_logged_without_its_path(server: PacsServer) -> None:
    """A log line named the request's path, which can be patient data (a
    patient's ID in a FHIR Patient id, an accession in /api/orders/...):
    the route's template is logged, the audit trail keeps who read what."""
    since = len(server.log_text())
    his = server.tokens["his"]  # type: ignore[attr-defined]
    with server.http(token=his) as http:
        too_large = http.put("/api/orders/BN-SECRET-4711", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                             headers={"Content-Type": "application/json"})
    assert too_large.status_code == 413
    log = server.log_text(since)
    assert "refused 413" in log and "/api/..." in log and "BN-SECRET-4711" not in log, log


def test_an_event_with_a_lone_surrogate_does_not_cost_the_batch(pg_url: str) -> None:
    """A lone surrogate in any text of an event (no client path is known to
    reach it since the JSON bodies refuse it) failed the write of its whole
    batch, which was dropped with up to 500 other users' events: it is
    stored with "?" in its place, the batch with it."""
    from pacs.audit import AuditTrail, Event
    from pacs.index import create_index_engine, upgrade_schema

    engine = create_index_engine(pg_url)
    upgrade_schema(engine)
    trail = AuditTrail(engine, flush_seconds=0.05)
    try:
        trail.record(Event("read", user="bs.an", detail="before"))
        trail.record(Event("read", user="x\ud800y", detail="odd \udfff one"))
        trail.record(Event("read", user="bs.an", detail="after"))
        trail.flush()
    finally:
        trail.close()
    with engine.connect() as conn:
        stored = conn.exec_driver_sql('SELECT "user", detail FROM audit_events ORDER BY pk').all()
    engine.dispose()
    assert [tuple(r) for r in stored] == [("bs.an", "before"), ("x?y", "odd ? one"), ("bs.an", "after")]
