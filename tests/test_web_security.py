"""Web security of the HTTP API (a security tester's findings): documents a
modality sent are never served as active content in our origin, every
answer carries the browser security headers, a cookie-authenticated change
from another site is refused, and a referring physician's access check and
audit see exactly the study WADO-URI serves."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from .conftest import Backend, PacsServer
from .qr_corpus import study_uid, write_corpus
from .test_tls import Pki, https_context, pki, start_server, stop_server  # noqa: F401 (pki: a fixture)
from .test_web_viewer import PASSWORD, USERNAME, page, sign_in, viewer_server  # noqa: F401 (fixtures)

EMR = "https://emr.bvdk.vn"
DOC_STUDY = "1.2.826.0.1.3680043.8.498.7001"
DOC_SERIES = "1.2.826.0.1.3680043.8.498.7001.1"
SCRIPT = b"<html><body><script>fetch('/api/users',{method:'POST'})</script></body></html>"
# An Encapsulated CDA whose narrative is XHTML with a script: a browser
# showing text/xml from our origin would run it.
CDA = (b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3">'
       b'<html xmlns="http://www.w3.org/1999/xhtml"><script>alert(document.cookie)</script></html>'
       b"</ClinicalDocument>")
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
DOCUMENTS = {  # SOP Instance UID -> (SOP Class, MIMETypeOfEncapsulatedDocument, bytes)
    "1.2.826.0.1.3680043.8.498.7001.1.1": ("1.2.840.10008.5.1.4.1.1.104.1", "text/html", SCRIPT),
    "1.2.826.0.1.3680043.8.498.7001.1.2": ("1.2.840.10008.5.1.4.1.1.104.2", "text/XML", CDA),
    "1.2.826.0.1.3680043.8.498.7001.1.3": ("1.2.840.10008.5.1.4.1.1.104.1", "application/pdf", PDF),
}
HTML_DOC, CDA_DOC, PDF_DOC = DOCUMENTS


def _write_documents(out: Path) -> None:
    """Encapsulated documents as a modality could send them (C-STORE or
    an import: the same ingest), one with an HTML document in it."""
    out.mkdir(parents=True, exist_ok=True)
    for n, (sop, (sop_class, mime, body)) in enumerate(DOCUMENTS.items()):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = DOC_STUDY, DOC_SERIES
        ds.PatientName, ds.PatientID = "Doc^Patient", "079000000777"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240301", "100000", "DOC001"
        ds.ReferringPhysicianName = "Phạm^An"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DOC", 1, n + 1
        ds.MIMETypeOfEncapsulatedDocument = mime
        ds.EncapsulatedDocument = body + b"\0" * (len(body) % 2)
        ds.EncapsulatedDocumentLength = len(body)
        ds.save_as(out / f"doc{n}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("websec")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}), extra_env={"PACS_CORS_ORIGINS": EMR})
    write_corpus(tmp / "corpus")
    _write_documents(tmp / "corpus" / "documents")
    server.cli("import", str(tmp / "corpus"))
    server.start()
    # S1 was referred by Đỗ^Thanh Tùng, S3 by another doctor (tests/qr_corpus.py).
    server.referring = server.make_token("dr-tung", "referring", display_name="Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
    server.reader = server.make_token("dr-reader", "radiologist")  # type: ignore[attr-defined]
    yield server
    server.stop()


def _wado(study: str, series: str, sop: str, **extra: str) -> dict[str, str]:
    return {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop, **extra}


def _rendered(sop: str) -> str:
    return f"/dicom-web/studies/{DOC_STUDY}/series/{DOC_SERIES}/instances/{sop}/rendered"


def _assert_attachment(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert not response.headers["content-type"].startswith(("text/html", "application/xhtml", "image/svg"))
    assert response.headers["content-disposition"].startswith("attachment"), response.headers
    csp = response.headers["content-security-policy"]
    assert "sandbox" in csp and "default-src 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"


# -- 1: stored XSS through encapsulated documents ------------------------------------------------
def test_documents_are_never_active_content_in_our_origin(server: PacsServer) -> None:
    with server.http() as http:
        # A PDF-class object whose MIMETypeOfEncapsulatedDocument says text/html.
        for response in (http.get("/wado", params=_wado(DOC_STUDY, DOC_SERIES, HTML_DOC, contentType="application/pdf")),
                         http.get(_rendered(HTML_DOC))):
            _assert_attachment(response)
            assert response.headers["content-type"] == "application/octet-stream"
            assert response.content == SCRIPT
        # CDA stays text/xml (PS3.18 Table 8.7.4-1), but downloaded and sandboxed.
        for response in (http.get("/wado", params=_wado(DOC_STUDY, DOC_SERIES, CDA_DOC, contentType="text/xml")),
                         http.get(_rendered(CDA_DOC), headers={"Accept": "text/xml"}), http.get(_rendered(CDA_DOC))):
            _assert_attachment(response)
            assert response.headers["content-type"].startswith("text/xml")
            assert response.content == CDA
        # A PDF is still shown in the browser (the viewer's "open PDF" link).
        for response in (http.get("/wado", params=_wado(DOC_STUDY, DOC_SERIES, PDF_DOC, contentType="application/pdf")),
                         http.get(_rendered(PDF_DOC))):
            assert response.status_code == 200 and response.headers["content-type"] == "application/pdf"
            assert response.headers["content-disposition"].startswith("inline")
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.content == PDF


# -- 2: security headers -----------------------------------------------------------------------
def test_every_answer_carries_the_security_headers(server: PacsServer) -> None:
    s1 = study_uid("S1")
    with server.http() as http:
        answers = [http.get("/"), http.get("/health"), http.get("/static/app.js"), http.get("/api/worklist"),
                   http.get(f"/dicom-web/studies/{s1}/thumbnail"), http.get("/no/such/path"),
                   http.get(f"/fhir/ImagingStudy/{s1}"), http.options("/dicom-web/studies", headers={
                       "Origin": EMR, "Access-Control-Request-Method": "GET"})]
        with server.http(token="none") as anonymous:
            answers.append(anonymous.get("/api/worklist"))  # a 401
    for answer in answers:
        where = f"{answer.request.method} {answer.request.url.path} -> {answer.status_code}"
        assert answer.headers.get("x-content-type-options") == "nosniff", where
        assert answer.headers.get("x-frame-options") == "DENY", where
        assert answer.headers.get("referrer-policy") == "no-referrer", where
        assert "strict-transport-security" not in answer.headers, where  # plain HTTP
    page_csp = answers[0].headers["content-security-policy"]
    assert "script-src 'self'" in page_csp and "frame-ancestors 'none'" in page_csp and "unsafe" not in page_csp
    assert answers[-2].headers["access-control-allow-origin"] == EMR  # CORS still answered


def test_hsts_over_https(tmp_path: Path, pki: Pki) -> None:  # noqa: F811 (the fixture)
    server = start_server(tmp_path / "data", {"PACS_TLS_CERT": str(pki.server_cert),
                                              "PACS_TLS_KEY": str(pki.server_key), "PACS_HTTP_TLS": "true"})
    try:
        with httpx.Client(base_url=f"https://localhost:{server.http_port}", timeout=30,
                          verify=https_context(pki, client_cert=False)) as client:
            answer = client.get("/health")
        assert answer.status_code == 200
        assert answer.headers["strict-transport-security"].startswith("max-age=")
    finally:
        stop_server(server)


def test_viewer_runs_under_its_content_security_policy(page: Any, viewer_server: PacsServer) -> None:  # noqa: F811
    """Log in, search the worklist, open a study: no CSP violation (the
    browser reports each one on the console) and no script error."""
    from playwright.sync_api import expect

    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    sign_in(page, USERNAME, PASSWORD)
    expect(page).to_have_url(re.compile(r"#/worklist$"))
    page.click("#search-button")
    rows = page.locator('[data-testid="study-row"]')
    expect(rows.first).to_be_visible()
    rows.first.click()
    expect(page).to_have_url(re.compile(r"#/study/"))
    page.wait_for_load_state("networkidle")
    assert not violations, violations
    assert not page.errors, page.errors


# -- 3: cross-site request forgery ---------------------------------------------------------------
@contextmanager
def _session(server: PacsServer) -> Iterator[httpx.Client]:
    """A browser-like client: the session cookie of a login, no Bearer token."""
    with server.http() as client:
        client.headers.pop("Authorization", None)
        login = client.post("/api/auth/login", json={"username": "dr-reader", "password": "test-password-123"})
        assert login.status_code == 200 and "pacs_session" in client.cookies
        yield client


def test_cookie_authenticated_changes_from_another_site_are_refused(server: PacsServer) -> None:
    study = study_uid("S4")
    own = f"http://127.0.0.1:{server.http_port}"
    with _session(server) as browser:
        draft = browser.put(f"/api/studies/{study}/report", json={"findings": "F", "impression": "I"},
                            headers={"Origin": own})
        assert draft.status_code == 200, draft.text
        # A form on evil.example posting to sign (empty body), as the tester did.
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Referer": "http://evil.example/page"}, {"Origin": "http://127.0.0.1.evil.example"},
                        {"Origin": "http://evil.example", "Referer": f"{own}/"}):
            refused = browser.post(f"/api/studies/{study}/report/sign", headers=headers)
            assert refused.status_code == 403, (headers, refused.text)
            assert "cross-site request refused" in refused.json()["error"]
        assert browser.get(f"/api/studies/{study}/report").json()["current"]["status"] == "draft"
        assert browser.post("/api/auth/logout", headers={"Origin": "http://evil.example"}).status_code == 403
        assert browser.get("/api/me").status_code == 200  # still logged in
        # The server's own page, a configured web origin, a Referer of ours: through.
        assert browser.put(f"/api/studies/{study}/report", json={"findings": "F2", "impression": "I"},
                           headers={"Origin": EMR}).status_code == 200
        assert browser.put(f"/api/studies/{study}/report", json={"findings": "F3", "impression": "I"},
                           headers={"Referer": f"{own}/#/study/{study}"}).status_code == 200
        signed = browser.post(f"/api/studies/{study}/report/sign", headers={"Origin": own})
        assert signed.status_code == 200, signed.text
    # A Bearer token is no ambient credential: any Origin may use it (CORS decides reading).
    with server.http(token=server.reader) as token_client:  # type: ignore[attr-defined]
        answer = token_client.put(f"/api/studies/{study_uid('S5')}/report", json={"findings": "x", "impression": "y"},
                                  headers={"Origin": "http://evil.example"})
        assert answer.status_code == 200, answer.text
    with server.http() as admin:
        refusals = admin.get("/api/audit", params={"action": "csrf"}).json()
    assert refusals and all(e["outcome"] == "denied" and e["user"] == "dr-reader" for e in refusals), refusals


# -- 4: the study checked and audited is the study served ----------------------------------------
def test_wado_uri_checks_and_audits_the_study_it_serves(server: PacsServer) -> None:
    s1, s3 = study_uid("S1"), study_uid("S3")
    with server.http() as admin:
        s3_instance = admin.get(f"/dicom-web/studies/{s3}/instances").json()[0]
        s1_instance = admin.get(f"/dicom-web/studies/{s1}/instances").json()[0]
    other = _wado(s3, s3_instance["0020000E"]["Value"][0], s3_instance["00080018"]["Value"][0])
    mine = _wado(s1, s1_instance["0020000E"]["Value"][0], s1_instance["00080018"]["Value"][0])
    with server.http(token=server.referring) as referring:  # type: ignore[attr-defined]
        assert referring.get("/wado", params=other).status_code == 403
        # A decoy naming a study they referred, in another spelling: refused, never served.
        for decoy in ({"StudyInstanceUID": s1}, {"studyinstanceuid": s1}, {"0020000D": s1}):
            answer = referring.get("/wado", params={**other, **decoy})
            assert answer.status_code == 400 and "more than one study" in answer.json()["error"], decoy
        doubled = referring.get("/wado", params=list(other.items()) + [("studyUID", s1)])
        assert doubled.status_code == 400
        # Their own study, even spelled twice, is theirs.
        assert referring.get("/wado", params=mine).status_code == 200
        assert referring.get("/wado", params={**mine, "StudyInstanceUID": s1}).status_code == 200
        # A query parameter a route does not serve is no study to check or audit.
        search = referring.get("/fhir/ImagingStudy", params={"identifier": "ACC001", "StudyInstanceUID": s3})
        assert search.status_code == 200, search.text
    with server.http() as admin:
        events = admin.get("/api/audit", params={"user": "dr-tung"}).json()
    served = [e for e in events if e["action"] == "retrieve" and e["outcome"] == "success"]
    assert len(served) == 2 and all(e["study_uid"] == s1 for e in served), served
    # Refused requests are recorded with the study asked for (S3), never with the decoy.
    assert [e["outcome"] for e in events if e["study_uid"] == s1 and e["action"] != "query"] == ["success", "success"], events
    assert any(e["study_uid"] == s3 and e["outcome"] == "denied" for e in events), events
    # The search names the study it showed (ACC001), never the one of a parameter it does not serve.
    assert [e["study_uid"] for e in events if e["action"] == "query" and e["study_uid"]] == [s1], events
