"""Audit trail review (2026-12, findings 1, 8 and 10): the syslog export
cannot be forged by what a client sends, refused requests say who and what,
a HEAD says so, and answers holding patient data are stored by no cache.

A real `pacs serve` with the QR corpus, httpx as the clients, the `pacs`
CLI as the operator exporting the trail."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from .conftest import Backend, PacsServer
from .peers import plain_http_ssl
from .qr_corpus import import_corpus, series_uid, sop_uid, study_uid

S1 = study_uid("S1")  # patient 001085012345^^^CCCD, referred by Đỗ^Thanh Tùng
S2 = study_uid("S2")  # the same patient, referred by Hoàng^Minh
S3 = study_uid("S3")
REFERRER = "Đỗ^Thanh Tùng"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("audit_review")
    srv = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    import_corpus(srv, tmp / "corpus")
    srv.start()
    srv.tokens = {role: srv.make_token(f"u-{role}", role, display_name=REFERRER)  # type: ignore[attr-defined]
                  for role in ("modality", "radiologist", "referring", "emr")}
    yield srv
    srv.stop()


def _client(server: PacsServer, role: str | None) -> httpx.Client:
    """A client of *role* (None: no credentials at all)."""
    client = httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30, verify=plain_http_ssl())
    if role is not None:
        token = server.token if role == "admin" else server.tokens[role]  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {token}"
    return client


def _events(server: PacsServer, **params: Any) -> list[dict[str, Any]]:
    """The trail, newest first (GET /api/audit writes what is queued first)."""
    with server.http() as http:
        answer = http.get("/api/audit", params={"limit": 500, **params})
    assert answer.status_code == 200, answer.text
    return [e for e in answer.json() if not e["detail"].startswith("/api/audit")]


def _last_pk(server: PacsServer) -> int:
    events = _events(server)
    return events[0]["pk"] if events else 0


def _since(server: PacsServer, pk: int, **params: Any) -> list[dict[str, Any]]:
    return [e for e in _events(server, **params) if e["pk"] > pk]


# -- 1. syslog ----------------------------------------------------------------------------
_HEADER = re.compile(r"<85>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")


def _parse_rfc5424(line: str) -> tuple[list[str], list[tuple[str, list[tuple[str, str]]]], str]:
    """A strict reading of an RFC 5424 line: the HEADER fields, the
    STRUCTURED-DATA elements (SD-ID, [(name, value)]) with 6.3.3's escapes
    undone, and the MSG. Fails on anything the grammar does not allow."""
    match = _HEADER.match(line)
    assert match, line
    header = list(match.groups())
    rest = line[match.end():]
    elements: list[tuple[str, list[tuple[str, str]]]] = []
    if rest.startswith("-"):
        return header, elements, rest[1:].lstrip(" ")
    while rest.startswith("["):
        sd_id = re.match(r"\[([^ =\]\"]{1,32})", rest)
        assert sd_id, rest
        rest = rest[sd_id.end():]
        params: list[tuple[str, str]] = []
        while rest.startswith(" "):
            name = re.match(r' ([^ =\]"]{1,32})="', rest)
            assert name, rest
            rest = rest[name.end():]
            value = []
            i = 0
            while True:
                char = rest[i]
                if char == "\\" and rest[i + 1] in '"\\]':
                    value.append(rest[i + 1])
                    i += 2
                    continue
                assert char not in '"]' or char == '"', f"unescaped {char!r} in a PARAM-VALUE: {line}"
                if char == '"':
                    break
                value.append(char)
                i += 1
            params.append((name.group(1), "".join(value)))
            rest = rest[i + 1:]
        assert rest.startswith("]"), f"element not closed: {line}"
        rest = rest[1:]
        elements.append((sd_id.group(1), params))
    assert elements, line
    return header, elements, rest.lstrip(" ")


def _naive_pairs(line: str) -> list[tuple[str, str]]:
    """What a SIEM rule reading key="value" pairs sees (no escapes known)."""
    return re.findall(r'(\w+)="([^"]*)"', line)


def _shown(value: str) -> str:
    """A value as a line of the export shows it: control and line-breaking
    characters as U+FFFD, a tab as a space."""
    return re.sub(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]", "\ufffd", value).replace("\t", " ")


def _escaped(value: str) -> str:
    """*value* as RFC 5424 6.3.3 writes a PARAM-VALUE."""
    return _shown(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


HOSTILE_STUDY = '1.2.3" outcome="success" user="dr.house" patient_id="001085012345'
HOSTILE_USERS = [
    'mallory" outcome="success" action="login',
    'Nguyễn Văn "An"] [audit@32473 user="admin"',
    "back\\slash\\",
    "[/x] [bold red]ok[/bold red]",
]


def test_syslog_lines_cannot_be_forged_by_client_values(server: PacsServer) -> None:
    """Finding 1: `"` in a searched Study UID of an unauthenticated QIDO and
    in failed logins' usernames made lines whose key="value" pairs said
    user="dr.house" outcome="success". Now every field is an RFC 5424
    PARAM-VALUE with `"`, `\\` and `]` escaped, whatever it holds (a row an
    older release wrote with a newline or NUL included), one line per event,
    Vietnamese as written; JSON and ATNA give the values back whole."""
    pk = _last_pk(server)
    with _client(server, None) as anonymous:
        assert anonymous.get("/dicom-web/studies", params={"StudyInstanceUID": HOSTILE_STUDY}).status_code == 401
        for user in HOSTILE_USERS:
            answer = anonymous.post("/api/auth/login", json={"username": user, "password": "wrong-password"})
            assert answer.status_code == 401, answer.text
    # A row such as a release before control characters were replaced at
    # write time left in the trail (the table only refuses UPDATE/DELETE).
    core = server.core()
    try:
        from sqlalchemy import insert

        from pacs.index.models import AuditEvent

        with core.engine.begin() as conn:
            conn.execute(insert(AuditEvent.__table__).values(
                at=datetime.now(UTC), action="login-failed", user='old\nrow" outcome="success\x00', role="",
                client="10.0.0.9\r\n<85>1 forged", protocol="http", outcome="failure", study_uid="",
                patient_id="", detail="tab\there\u2028and a line separator"))
    finally:
        core.close()

    plain = _since(server, pk)
    limit = str(len(plain) + 10)  # newest first, with the admin's reads of the trail among them

    def ours(lines: list[str]) -> list[str]:
        # Not the reads of the trail (GET /api/audit, `pacs audit`: each is itself an event).
        return [line for line in lines if 'detail="/api/audit' not in line
                and 'detail="pacs audit ' not in line][:len(plain)]

    cli_lines = ours(server.cli("audit", "--format", "syslog", "--limit", limit).stdout.splitlines())
    with server.http() as http:
        http_lines = ours(http.get("/api/audit", params={"format": "syslog", "limit": limit}).text.splitlines())
        atna = http.get("/api/audit", params={"format": "atna", "limit": limit}).json()
    assert len(cli_lines) == len(plain) and len(http_lines) == len(plain), (cli_lines, http_lines)

    for lines in (cli_lines, http_lines):
        for line, event in zip(lines, plain, strict=True):
            header, elements, msg = _parse_rfc5424(line)
            assert header[2] == "filmless-pacs" and header[4] == "AUDIT", header
            assert all("!" <= c <= "~" for field in header for c in field), header
            assert len(elements) == 1 and elements[0][0] == "audit@32473", line
            params = dict(elements[0][1])
            assert len(params) == len(elements[0][1]), f"a parameter twice: {line}"
            assert msg == ""
            assert params["source"] == server.ae_title
            for key in ("user", "role", "client", "protocol", "action", "outcome", "study_uid", "patient_id",
                        "detail"):
                assert params.get(key, "") == _shown(event[key]), (key, line)
            # A reader that knows no escapes still sees no forged key: the
            # first value of each key is the event's own start.
            seen: dict[str, str] = {}
            for key, value in _naive_pairs(line):
                seen.setdefault(key, value)
            assert seen.get("outcome") == event["outcome"], line
            assert seen.get("action") == event["action"], line
            if event["user"]:
                assert _escaped(event["user"]).startswith(seen["user"]), line
            else:
                assert "user" not in seen, line

    by_user = {e["user"]: e for e in plain}
    for user in HOSTILE_USERS:
        assert by_user[user]["action"] == "login-failed" and by_user[user]["outcome"] == "failure"
    denied = [e for e in plain if e["study_uid"] == HOSTILE_STUDY]
    assert denied and denied[0]["outcome"] == "denied" and denied[0]["user"] == ""
    # Vietnamese is read as written, not as escapes.
    assert any('user="Nguyễn Văn \\"An\\"\\] [audit@32473 user=\\"admin\\""' in line for line in cli_lines)
    # ATNA (JSON) gives each value back whole.
    users = {e["ActiveParticipant"][0]["UserID"] for e in atna}
    assert set(HOSTILE_USERS) <= users
    assert 'old\ufffdrow" outcome="success\ufffd' in users or 'old\nrow" outcome="success\x00' in users

    # The table a terminal shows: values are text, not markup (a username
    # "[/x]" stopped the command with a MarkupError).
    table = server.cli("audit", "--format", "table", "--limit", limit).stdout
    assert "[/x]" in table


# -- 8. who and what of a refusal -----------------------------------------------------------
def test_a_refused_token_is_recorded_with_its_user_and_what_was_asked(server: PacsServer) -> None:
    """Finding 8: a revoked or expired token was recorded as no user at all
    (`pacs audit --user bob` did not show bob's revoked token still in use),
    and 401/403 events dropped the path and query searched."""
    with server.http() as admin:
        assert admin.post("/api/users", json={"username": "bob", "role": "radiologist",
                                              "password": "bob-password-1"}).status_code == 201
        laptop = admin.post("/api/tokens", json={"username": "bob", "name": "laptop"}).json()["token"]
        tablet = admin.post("/api/tokens", json={"username": "bob", "name": "tablet", "days": 30}).json()["token"]
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30,
                      headers={"Authorization": f"Bearer {laptop}"}) as bob:
        assert bob.get("/api/worklist", params={"q": "nguyen"}).status_code == 200
    with server.http() as admin:
        assert admin.delete("/api/tokens/bob/laptop").json() == {"revoked": 1}
    core = server.core()
    try:
        from sqlalchemy import update

        from pacs.index.models import ApiToken

        with core.engine.begin() as conn:  # the tablet's token ran out
            conn.execute(update(ApiToken.__table__).where(ApiToken.__table__.c.name == "tablet")
                         .values(expires_at=datetime.now(UTC) - timedelta(hours=1)))
    finally:
        core.close()

    pk = _last_pk(server)
    for token, path in ((laptop, f"/dicom-web/studies/{S1}/metadata"), (tablet, "/api/worklist?q=nguyen"),
                        ("never-issued-token", "/api/worklist?q=tran")):
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get(path).status_code == 401
    with _client(server, None) as anonymous:
        assert anonymous.get("/api/worklist", params={"q": "le"}).status_code == 401
    with _client(server, "modality") as modality:
        assert modality.get("/api/worklist", params={"q": "hoa"}).status_code == 403

    events = _since(server, pk)
    bobs = _since(server, pk, user="bob")
    assert len(bobs) == 2 and all(e["outcome"] == "denied" for e in bobs), bobs
    revoked = next(e for e in bobs if "laptop" in e["detail"])
    assert revoked["action"] == "retrieve" and revoked["study_uid"] == S1
    assert revoked["patient_id"] == "001085012345^^^CCCD"
    assert f"/dicom-web/studies/{S1}/metadata" in revoked["detail"] and "revoked" in revoked["detail"]
    expired = next(e for e in bobs if "tablet" in e["detail"])
    assert "/api/worklist?q=nguyen" in expired["detail"] and "expired" in expired["detail"]
    unknown = next(e for e in events if "q=tran" in e["detail"])
    assert unknown["user"] == "" and unknown["outcome"] == "denied" and "unknown token" in unknown["detail"]
    assert "never-issued-token" not in json.dumps(events)  # never the token itself
    nobody = next(e for e in events if "q=le" in e["detail"])
    assert nobody["user"] == "" and "no credentials" in nobody["detail"]
    wrong_role = next(e for e in events if "q=hoa" in e["detail"])
    assert wrong_role["user"] == "u-modality" and wrong_role["outcome"] == "denied"
    assert "/api/worklist?q=hoa" in wrong_role["detail"] and "403" in wrong_role["detail"]


def test_a_refused_fhir_report_read_names_its_study_and_patient(server: PacsServer) -> None:
    """Finding 8: a referring physician's refused DiagnosticReport read
    (read or vread of a study they did not refer) was recorded without study
    or patient: `pacs audit --study` / `--patient` missed the attempt."""
    pk = _last_pk(server)
    with _client(server, "referring") as referring:
        assert referring.get(f"/fhir/DiagnosticReport/{S2}").status_code == 403
        assert referring.get(f"/fhir/DiagnosticReport/{S2}/_history/1").status_code == 403
    refused = [e for e in _since(server, pk, user="u-referring") if "/fhir/DiagnosticReport" in e["detail"]]
    assert len(refused) == 2, refused
    for event in refused:
        assert event["outcome"] == "denied" and event["study_uid"] == S2, event
        assert event["patient_id"] == "001085012345^^^CCCD", event
    found = json.loads(server.cli("audit", "--patient", "001085012345", "--user", "u-referring").stdout)
    assert {e["pk"] for e in refused} <= {e["pk"] for e in found}


def test_a_head_of_a_study_is_audited_as_a_head(server: PacsServer) -> None:
    """Also seen: a HEAD of a whole study was recorded exactly as the GET
    that sends it (retrieve success, the same detail)."""
    pk = _last_pk(server)
    with _client(server, "radiologist") as radiologist:
        assert radiologist.head(f"/dicom-web/studies/{S1}").status_code == 200
        assert radiologist.get(f"/dicom-web/studies/{S1}").status_code == 200
        assert radiologist.head(f"/dicom-web/studies/{S3}/metadata").status_code == 200
    events = list(reversed(_since(server, pk, user="u-radiologist")))
    assert [e["detail"] for e in events] == [
        f"HEAD /dicom-web/studies/{S1}", f"/dicom-web/studies/{S1}", f"HEAD /dicom-web/studies/{S3}/metadata"]
    assert [e["study_uid"] for e in events] == [S1, S1, S3]
    with _client(server, "modality") as modality:  # a refused HEAD says so too
        assert modality.head(f"/dicom-web/studies/{S1}").status_code == 403
    refused = _since(server, pk, user="u-modality")
    assert refused and refused[0]["detail"].startswith(f"HEAD /dicom-web/studies/{S1} -> 403")


# -- 10. caches -------------------------------------------------------------------------------
def _no_store(answer: httpx.Response) -> bool:
    directives = {d.strip().lower() for d in answer.headers.get("cache-control", "").split(",")}
    return "no-store" in directives


def test_answers_with_patient_data_are_stored_by_no_cache(server: PacsServer) -> None:
    """Finding 10: no answer carried Cache-Control, and a DiagnosticReport
    read came with Last-Modified: a browser (an EMR's page, a shared
    reading-room PC) could keep images and reports on disk and serve a
    repeat read from its cache, past the access check, the audit trail and
    an amendment. The viewer's own files stay cacheable."""
    with _client(server, "radiologist") as radiologist:
        assert radiologist.put(f"/api/studies/{S3}/report",
                               json={"findings": "Gan bình thường.", "impression": "Không bất thường."}
                               ).status_code == 200
        assert radiologist.post(f"/api/studies/{S3}/report/sign").status_code == 200
    series, sop = series_uid("S1", 0), sop_uid("S1", 0, 0)
    instance = f"/dicom-web/studies/{S1}/series/{series}/instances/{sop}"
    reads = [
        "/dicom-web/studies", f"/dicom-web/studies/{S1}", f"/dicom-web/studies/{S1}/metadata", instance,
        instance + "/metadata", instance + "/frames/1", instance + "/rendered", instance + "/thumbnail",
        f"/dicom-web/studies/{S1}/thumbnail", f"/dicom-web/studies/{S1}/series/{series}/rendered",
        f"/wado?requestType=WADO&studyUID={S1}&seriesUID={series}&objectUID={sop}&contentType=image/jpeg",
        f"/wado?requestType=WADO&studyUID={S1}&seriesUID={series}&objectUID={sop}&contentType=application/dicom",
        "/api/worklist", f"/api/studies/{S1}", f"/api/studies/{S1}/priors", f"/api/studies/{S3}/report",
        f"/api/studies/{S3}/report/pdf", "/fhir/Patient?name=nguyen", f"/fhir/ImagingStudy/{S1}",
        f"/fhir/DiagnosticReport/{S3}", f"/fhir/DiagnosticReport/{S3}/_history/1",
        "/fhir/DiagnosticReport?patient.identifier=CCCD|079190000111",
        "/api/me",
    ]
    with _client(server, "admin") as admin:
        for path in reads:
            answer = admin.get(path)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])
            assert _no_store(answer), (path, answer.headers.get("cache-control"))
        assert _no_store(admin.head(f"/dicom-web/studies/{S1}"))
        assert _no_store(admin.get(f"/dicom-web/studies/{S1}/series/1.2.3/metadata"))  # an error too
        assert _no_store(admin.get("/api/audit"))
    # A repeat FHIR read reaches the server, so it is audited each time.
    with _client(server, "emr") as emr:
        pk = _last_pk(server)
        for _ in range(2):
            report = emr.get(f"/fhir/DiagnosticReport/{S3}")
            assert report.status_code == 200 and _no_store(report)
            assert report.headers["etag"] == 'W/"1"'  # versions stay comparable
    assert len([e for e in _since(server, pk, user="u-emr") if e["study_uid"] == S3]) == 2
    # Patient data is no one else's either: refused answers are not kept.
    with _client(server, None) as anonymous:
        assert _no_store(anonymous.get(f"/dicom-web/studies/{S1}/metadata"))
        # The viewer's own files and the public CapabilityStatement: cacheable.
        for path in ("/static/app.js", "/static/style.css", "/fhir/metadata"):
            answer = anonymous.get(path)
            assert answer.status_code == 200 and not _no_store(answer), path
        assert anonymous.get("/").headers["cache-control"] == "no-cache"  # revalidated, holds no patient data
