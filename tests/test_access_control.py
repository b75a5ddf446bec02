"""Issue 6 acceptance 3-4: every HTTP route checks its role (401 without a
credential, 403 for the wrong role, through for the right one), and every
access lands in the audit trail with the right user and study."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from .conftest import Backend, PacsServer
from .qr_corpus import import_corpus, study_uid

ROLES = ["modality", "radiologist", "referring", "emr", "his", "admin", "monitor"]
READ = {"radiologist", "admin", "emr", "referring"}
# Patient share links: the HIS prints them; readers of the images but the EMR.
SHARE = {"radiologist", "admin", "his", "referring"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("acl")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_CORS_ORIGINS": "https://emr.bvdk.vn, https://ohif.bvdk.vn/"})
    import_corpus(server, tmp / "corpus")
    server.start()
    server.tokens = {role: server.make_token(f"user-{role}", role, display_name="Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
                     for role in ROLES}
    server.corpus_dir = tmp / "corpus"  # type: ignore[attr-defined]
    yield server
    server.stop()


def _routes(server: PacsServer) -> list[tuple[str, str, set[str], dict | None]]:
    """(method, path, roles allowed, JSON body) for every protected route."""
    s1 = study_uid("S1")  # referred by Đỗ^Thanh Tùng, the referring user's display name
    ds = dcmread(next(iter(sorted(server.corpus_dir.glob("S1_0_0.dcm")))), stop_before_pixels=True)  # type: ignore[attr-defined]
    inst = f"/dicom-web/studies/{s1}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    # Referred by the referring user: it may share the order (POST /api/orders/ACL-1/shares).
    order = {"patient": {"id": "079000000999", "name": "Test^Order"}, "accession_number": "ACL-1", "modality": "CT",
             "referring_physician": "Đỗ^Thanh Tùng"}
    wado = f"/wado?requestType=WADO&studyUID={s1}&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
    return [
        ("GET", "/dicom-web/studies", {"radiologist", "admin", "emr"}, None),
        ("GET", f"/dicom-web/studies/{s1}/series", {"radiologist", "admin", "emr"}, None),
        ("GET", f"/dicom-web/studies/{s1}/metadata", READ, None),
        ("GET", inst, READ, None),
        ("GET", inst + "/rendered", READ, None),
        ("GET", inst + "/frames/1", READ, None),
        ("GET", f"/dicom-web/studies/{s1}/thumbnail", READ, None),
        ("GET", wado, READ, None),
        ("POST", "/dicom-web/studies", {"modality", "admin"}, None),
        ("GET", "/api/worklist", READ, None),
        ("GET", f"/api/studies/{s1}", READ, None),
        ("GET", f"/api/studies/{s1}/report", READ, None),
        ("GET", f"/api/studies/{s1}/media", READ, None),  # the study for the patient's CD
        ("PUT", f"/api/studies/{s1}/report", {"radiologist"}, {"findings": "x", "impression": "y"}),
        ("POST", f"/api/studies/{s1}/report/amend", {"radiologist"}, None),
        ("GET", "/api/report-templates?modality=CT", {"radiologist", "admin"}, None),
        ("POST", "/api/report-templates", {"radiologist", "admin"}, {"name": "ACL", "findings": "Bình thường."}),
        ("POST", "/api/orders", {"his", "admin"}, order),
        ("GET", "/api/orders/ACL-1", {"his", "admin", "radiologist"}, None),
        ("GET", "/api/studies/unmatched", {"admin"}, None),
        ("GET", f"/api/studies/{s1}/corrections", {"admin", "radiologist"}, None),
        ("GET", "/api/users", {"admin"}, None),
        ("GET", "/api/audit", {"admin"}, None),
        ("GET", "/fhir/ImagingStudy?identifier=ACC001", READ, None),
        ("GET", f"/fhir/ImagingStudy/{s1}", READ, None),
        ("GET", "/fhir/DiagnosticReport?identifier=ACC001", READ, None),
        ("GET", "/fhir/Endpoint/dicomweb", READ, None),
        # Deletion is for admins (an unknown study here: the admin gets 404, nothing is deleted).
        ("DELETE", "/api/studies/1.2.3.404?reason=test", {"admin"}, None),
        ("DELETE", "/api/studies/1.2.3.404/series/1.2.3.405?reason=test", {"admin"}, None),
        ("DELETE", "/api/studies/1.2.3.404/series/1.2.3.405/instances/1.2.3.406?reason=test", {"admin"}, None),
        ("GET", "/fhir/Patient?identifier=001085012345", READ, None),
        ("GET", "/fhir/Patient/CCCD.001085012345", READ, None),  # S1's patient
        ("POST", f"/api/studies/{s1}/shares", SHARE, {"days": 1}),
        ("GET", f"/api/studies/{s1}/shares", SHARE, None),
        ("DELETE", "/api/shares/999999", SHARE, None),  # no such link: 404 for those allowed
        ("POST", "/api/orders/ACL-1/shares", SHARE, {"days": 1}),  # before the order's images
        ("GET", "/api/orders/ACL-1/shares", SHARE, None),
        ("GET", "/metrics", {"monitor", "admin"}, None),
    ]


def test_every_route_checks_its_role(secured: PacsServer) -> None:
    failures = []
    for method, path, allowed, body in _routes(secured):
        with secured.http(token="none") as anonymous:
            anonymous.headers.pop("Authorization", None)
            answer = anonymous.request(method, path, json=body)
            code = answer.status_code
            if code != 401:
                failures.append(f"{method} {path} without a token -> {code}, want 401")
            elif not answer.headers.get("www-authenticate", "").startswith("Bearer "):
                failures.append(f"{method} {path}: 401 without WWW-Authenticate: Bearer")
        for role in ROLES:
            with secured.http(token=secured.tokens[role]) as http:  # type: ignore[attr-defined]
                response = http.request(method, path, json=body)
            if role in allowed:
                if response.status_code in (401, 403):
                    failures.append(f"{method} {path} as {role} -> {response.status_code}, want access")
            elif response.status_code != 403:
                failures.append(f"{method} {path} as {role} -> {response.status_code}, want 403")
            elif "error" not in response.json() and response.json().get("resourceType") != "OperationOutcome":
                # (FHIR routes answer errors as OperationOutcome resources.)
                failures.append(f"{method} {path} as {role}: 403 without an error body")
    assert not failures, "\n".join(failures)


def test_public_routes(secured: PacsServer) -> None:
    with secured.http() as http:
        http.headers.pop("Authorization", None)
        assert http.get("/health").status_code == 200
        assert http.get("/").status_code == 200
        # The API's map is for signed-in users (any role), not for anyone on the network.
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert http.get(path).status_code == 401, path
        assert http.get(f"/viewer/study/{study_uid('S1')}", follow_redirects=False).status_code == 302
        # A share link's page needs its token only (tests/test_share_links.py): an unknown one is a 404.
        assert http.get("/share/" + "A" * 32).status_code == 404
        # An accession link is resolved by the viewer after login: before it,
        # a known and an unknown accession number get the same answer.
        for accession in ("ACC001", "NOPE"):
            link = http.get(f"/viewer/accession/{accession}", follow_redirects=False)
            assert (link.status_code, link.headers["location"]) == (302, f"/#/accession/{accession}")


def test_api_docs_for_every_signed_in_role(secured: PacsServer) -> None:
    """/openapi.json, /docs and /redoc answer any role but a monitoring
    system's (it reads /metrics and /health only); the reads are audited."""
    with secured.http(secured.tokens["monitor"]) as http:  # type: ignore[attr-defined]
        for page in ("/openapi.json", "/docs", "/redoc"):
            assert http.get(page).status_code == 403, page
    for role, token in secured.tokens.items():  # type: ignore[attr-defined]
        if role == "monitor":
            continue
        with secured.http(token) as http:
            spec = http.get("/openapi.json")
            assert spec.status_code == 200 and "/dicom-web/studies" in spec.json()["paths"], role
            for page in ("/docs", "/redoc"):
                html = http.get(page)
                assert html.status_code == 200 and "/openapi.json" in html.text, (role, page)
    wanted = {f"user-{role}" for role in secured.tokens if role != "monitor"}  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while True:  # audit events are written in batches
        with secured.http() as http:
            events = http.get("/api/audit", params={"action": "api-docs"}).json()
        users = {e["user"] for e in events if e["outcome"] == "success"}
        if users >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert users == wanted


def _study_routes(server: PacsServer, key: str) -> list[str]:
    """Every route that reads one study's data, across the APIs."""
    uid = study_uid(key)
    ds = dcmread(next(iter(sorted(server.corpus_dir.glob(f"{key}_0_0.dcm")))), stop_before_pixels=True)  # type: ignore[attr-defined]
    inst = f"/dicom-web/studies/{uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    return [
        f"/api/studies/{uid}", f"/api/studies/{uid}/report", f"/api/studies/{uid}/media",
        f"/dicom-web/studies/{uid}", f"/dicom-web/studies/{uid}/metadata", inst, inst + "/metadata",
        inst + "/frames/1", inst + "/rendered", f"/dicom-web/studies/{uid}/thumbnail",
        f"/wado?requestType=WADO&studyUID={uid}&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
        "&contentType=application/dicom",
        f"/fhir/ImagingStudy/{uid}",
    ]


def test_referring_physician_sees_only_referred_studies(secured: PacsServer) -> None:
    """One rule on every API: a referring physician reads the studies they
    referred (S1), and nothing of another (S2, same patient), by any route."""
    with secured.http(token=secured.tokens["referring"]) as http:  # type: ignore[attr-defined]
        listed = http.get("/api/worklist").json()["items"]
        assert {i["study_uid"] for i in listed} == {study_uid("S1")}
        refused = {path: http.get(path).status_code for path in _study_routes(secured, "S2")}
        assert set(refused.values()) == {403}, refused
        allowed = {path: http.get(path).status_code for path in _study_routes(secured, "S1")}
        assert all(code == 200 for code in allowed.values()), allowed
        # Searches that name a patient, not a study, answer only the referred studies.
        for resource in ("ImagingStudy", "DiagnosticReport"):
            for query in ("identifier=ACC002", "patient.identifier=001085012345"):
                bundle = http.get(f"/fhir/{resource}?{query}").json()
                assert study_uid("S2") not in json.dumps(bundle), (resource, query)
        found = http.get("/fhir/ImagingStudy?patient.identifier=001085012345").json()
        assert [e["resource"]["id"] for e in found["entry"]] == [study_uid("S1")]
    # Another doctor whose name differs only in a diacritic (Tung, not Tùng) is another
    # person: nothing; the same name in capitals is the same person.
    other = secured.make_token("user-tung", "referring", display_name="Đỗ^Thanh Tung")
    same = secured.make_token("user-tung-caps", "referring", display_name="ĐỖ^THANH TÙNG^")
    for token, expected in ((other, set()), (same, {study_uid("S1")})):
        with secured.http(token=token) as http:
            assert {i["study_uid"] for i in http.get("/api/worklist").json()["items"]} == expected
            assert http.get(f"/api/studies/{study_uid('S1')}").status_code == (200 if expected else 403)


def test_login_logout_and_revoked_tokens(secured: PacsServer) -> None:
    with secured.http() as http:
        http.headers.pop("Authorization", None)
        bad = http.post("/api/auth/login", json={"username": "user-radiologist", "password": "nope-nope"})
        assert bad.status_code == 401 and "wrong username or password" in bad.json()["error"]
        good = http.post("/api/auth/login", json={"username": "user-radiologist", "password": "test-password-123"})
        assert good.status_code == 200 and good.json()["user"]["role"] == "radiologist"
        assert "pacs_session" in good.cookies
        assert http.get("/api/me").json()["username"] == "user-radiologist"  # the cookie
        assert http.post("/api/auth/logout").status_code == 204
        assert http.get("/api/me", headers={"Authorization": f"Bearer {good.json()['token']}"}).status_code == 401
        # Ended sessions are not kept (one row per login was, for good): the
        # next login clears them.
        again = http.post("/api/auth/login", json={"username": "user-radiologist", "password": "test-password-123"})
        assert again.status_code == 200
    core = secured.core()
    try:
        from sqlalchemy import func, select

        from pacs.index.models import ApiToken, User

        with core.engine.connect() as conn:
            sessions = conn.execute(select(func.count()).select_from(ApiToken).join(User, User.pk == ApiToken.user_pk)
                                    .where(User.username == "user-radiologist", ApiToken.name == "session")).scalar()
    finally:
        core.close()
    assert sessions == 1
    token = json.loads(secured.cli("token", "create", "user-emr", "--name", "emr-link", "--json").stdout)["token"]
    with secured.http(token=token) as http:
        assert http.get("/api/worklist").status_code == 200
        secured.cli("token", "revoke", "user-emr", "--name", "emr-link")
        # Tokens are no longer cached (pacs/auth.py, authenticate): a revoked one stops at once.
        assert http.get("/api/worklist").status_code == 401


def _get_as(server: PacsServer, role: str, path: str) -> int:
    with server.http(token=server.tokens[role]) as http:  # type: ignore[attr-defined]
        return http.get(path).status_code


def test_accesses_are_audited_with_user_and_study(secured: PacsServer) -> None:
    s1 = study_uid("S1")
    assert _get_as(secured, "radiologist", f"/dicom-web/studies/{s1}/metadata") == 200
    assert _get_as(secured, "modality", f"/dicom-web/studies/{s1}/metadata") == 403
    with secured.http() as http:
        events = http.get("/api/audit", params={"study": s1}).json()
        atna = http.get("/api/audit", params={"study": s1, "format": "atna"}).json()
        syslog = http.get("/api/audit", params={"study": s1, "format": "syslog"}).text
    seen = {(e["user"], e["role"], e["action"], e["outcome"]) for e in events}
    assert ("user-radiologist", "radiologist", "retrieve", "success") in seen
    assert ("user-modality", "modality", "retrieve", "denied") in seen
    # The patient is recorded with the study ("who saw which patient"), with
    # the issuer of its ID (ID^^^issuer, HL7 CX).
    assert {e["patient_id"] for e in events} == {"001085012345^^^CCCD"}
    # Over HTTP, with the caller's address (the import that brought the study is a command's).
    assert all(e["client"] == "127.0.0.1" for e in events if e["protocol"] == "http")
    assert atna[0]["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == s1
    assert "AUDIT" in syslog and s1 in syslog
    exported = json.loads(secured.cli("audit", "--study", s1).stdout)  # JSON when piped
    assert len(exported) >= 2
    table = secured.cli("audit", "--study", s1, "--format", "table").stdout  # what a terminal shows
    # One more: the export before, a read of the study's trail, is itself audited.
    assert table.startswith(f"audit trail ({len(exported) + 1} events") and "{" not in table
    # The trail is append-only: the database itself refuses edits.
    from sqlalchemy import text

    core = secured.core()
    try:
        with pytest.raises(Exception, match="append-only"), core.engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_events"))
    finally:
        core.close()


def test_audit_outcome_is_the_answer(secured: PacsServer) -> None:
    """An access is recorded with what it got: a 404 or a refused request is
    not a successful read, and a referring physician's refusal is one event."""
    missing = "1.2.826.0.1.3680043.8.498.404404"
    mine = {"study": study_uid("S2"), "user": "user-referring"}
    with secured.http() as http:
        before = len(http.get("/api/audit", params=mine).json())
    assert _get_as(secured, "radiologist", f"/dicom-web/studies/{missing}/metadata") == 404
    assert _get_as(secured, "referring", f"/api/studies/{study_uid('S2')}") == 403
    with secured.http() as http:
        gone = http.get("/api/audit", params={"study": missing}).json()
        refused = http.get("/api/audit", params=mine).json()
    assert [(e["action"], e["outcome"]) for e in gone] == [("retrieve", "failure")]
    assert gone[0]["detail"].endswith("-> 404")
    assert [(e["action"], e["outcome"]) for e in refused[: len(refused) - before]] == [("view", "denied")]


def test_auth_can_only_be_disabled_explicitly(tmp_path: Path) -> None:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={"PACS_AUTH_ENABLED": "false"})
    server.token = "-"  # no test user: nobody is needed
    server.start()
    try:
        with server.http() as http:
            http.headers.pop("Authorization", None)
            assert http.get("/api/me").json()["role"] == "admin"
        assert "DISABLED" in server.log_text()
    finally:
        server.stop()


def test_dicom_accesses_are_audited(secured: PacsServer, tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    from .dicomfiles import make_ct

    ct = make_ct(tmp_path / "audited.dcm")
    assert secured.storescu(str(ct), calling="CT_AUDIT").returncode == 0
    ae = AE(ae_title="WS_AUDIT")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", secured.dicom_port, ae_title=secured.ae_title)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid("S3")
    assert [s.Status for s, _ in assoc.send_c_find(query, FIND)][-1] == 0
    assoc.release()
    with secured.http() as http:
        stored = http.get("/api/audit", params={"user": "CT_AUDIT"}).json()
        queried = http.get("/api/audit", params={"user": "WS_AUDIT"}).json()
    assert stored and stored[0]["action"] == "store" and stored[0]["protocol"] == "dicom"
    assert stored[0]["study_uid"] == str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    assert queried and queried[0]["action"] == "query" and queried[0]["study_uid"] == study_uid("S3")


def test_cors_lets_only_configured_web_origins_call(secured: PacsServer) -> None:
    """An EMR page or an OHIF viewer on another host calls DICOMweb from the
    browser: its preflight is answered, the real request still needs a token."""
    emr = "https://emr.bvdk.vn"
    with secured.http(token="none") as anonymous:
        anonymous.headers.pop("Authorization", None)
        preflight = anonymous.options("/dicom-web/studies", headers={
            "Origin": emr, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == emr
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = anonymous.get("/dicom-web/studies", headers={"Origin": emr})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == emr
        other = anonymous.options("/dicom-web/studies", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    with secured.http(token=secured.tokens["emr"]) as http:  # type: ignore[attr-defined]
        answer = http.get("/dicom-web/studies", headers={"Origin": "https://ohif.bvdk.vn"})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://ohif.bvdk.vn"
        assert "access-control-allow-origin" not in http.get(
            "/dicom-web/studies", headers={"Origin": "https://evil.example"}).headers
