"""GET /metrics (Prometheus text format) against real `pacs serve` processes
on SQLite + files and PostgreSQL + S3: the text parses with
prometheus_client, the figures move when DCMTK's storescu sends a study,
the routing queue and the outbox show, no patient data is in it, only the
monitor and admin roles read it (scrapes are not audited, refusals are, at
a bounded rate), DICOM workers' associations and objects are counted, and
the counters read from the index follow rows committed out of key order on
PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import insert

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import make_ct
from .peers import plain_http_ssl, wait_until

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATIENT_ID = "BN-MET-0042"
PATIENT_NAME = "Nguyễn^Văn Ánh"
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(server: PacsServer, token: str | None) -> Samples:
    """The samples of one scrape, by sample name (prometheus_client's parser)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30, verify=plain_http_ssl(),
                      headers={"Authorization": f"Bearer {token}"} if token else {}) as http:
        answer = http.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == CONTENT_TYPE
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    samples["_text"] = [({"text": answer.text}, 0.0)]
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of *name*'s samples whose labels include *labels* (None: no such sample)."""
    found = [v for have, v in samples.get(name, []) if all(have.get(k) == want for k, want in labels.items())]
    return sum(found) if found else None


@pytest.fixture
def monitored(tmp_path: Path, backend: Backend) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", backend, extra_env={"PACS_METRICS_CACHE_SECONDS": "0"}).start()
    server.monitor = server.make_token("prometheus", "monitor")  # type: ignore[attr-defined]
    yield server
    server.stop()


def _study(folder: Path, count: int) -> tuple[str, list[str]]:
    """*count* CT images of one study of a patient with a Vietnamese name."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    uids = []
    for i in range(count):
        path = make_ct(folder / f"ct{i}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                       PatientID=PATIENT_ID, PatientName=PATIENT_NAME, SpecificCharacterSet="ISO_IR 192",
                       AccessionNumber="ACC-MET-1", InstanceNumber=i + 1)
        uids.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return study, uids


def test_figures_follow_a_study_sent_with_storescu(monitored: PacsServer, tmp_path: Path) -> None:
    server = monitored
    token = server.monitor  # type: ignore[attr-defined]
    before = scrape(server, token)
    assert value(before, "pacs_index_up") == 1
    assert value(before, "pacs_instances") == 0 and value(before, "pacs_studies") == 0
    assert value(before, "pacs_build_info") == 1
    assert value(before, "pacs_node_info", ae_title=server.ae_title) == 1
    assert value(before, "pacs_health_ok", check="index") == 1
    assert value(before, "pacs_health_ok", check="storage") == 1
    assert value(before, "pacs_filesystem_free_bytes", volume="data") > 0
    assert value(before, "pacs_index_database_bytes") > 0
    if server.backend.storage_url is None:  # a filesystem store: its free space is known
        assert value(before, "pacs_filesystem_free_bytes", volume="objects") > 0
    assert value(before, "pacs_dicom_associations_open") == 0
    assert value(before, "process_start_time_seconds") > 0

    # Routed to an AE nobody listens at: the jobs wait in the queue.
    server.cli("ae", "add", "AI_NODE", "--host", "127.0.0.1", "--port", str(free_port()))
    server.cli("route", "add", "to-ai", "--if", "Modality=CT", "--to-ae", "AI_NODE")
    # A DICOMweb destination whose URL carries credentials: they are not shown.
    server.cli("route", "add", "to-cloud", "--if", "Modality=CT", "--to-url",
               f"http://pacs:S3cr3t-pw@127.0.0.1:{free_port()}/dicom-web?key=k3y-s3cr3t")
    sent_after = time.time()
    study, uids = _study(tmp_path / "study", 3)
    assert server.storescu("+sd", str(tmp_path / "study"), calling="CT_ROOM1").returncode == 0
    # The same SOP Instance UID in another study: refused 0x0111 (kept elsewhere).
    conflict = make_ct(tmp_path / "conflict.dcm", sop_uid=uids[0], PatientID="OTHER-9")
    server.storescu(str(conflict), calling="CT_ROOM1")

    def routed() -> bool:
        now = scrape(server, token)
        queued = sum(value(now, "pacs_routing_jobs", destination="AI_NODE", state=s) or 0
                     for s in ("pending", "sending"))
        return queued == 3 and value(now, "pacs_dicom_store_refused_total", status="0x0111") == 1

    assert wait_until(routed, timeout=30)
    after = scrape(server, token)
    assert value(after, "pacs_instances") == 3
    assert value(after, "pacs_studies") == 1 and value(after, "pacs_series") == 1
    assert value(after, "pacs_patients") == 1
    assert value(after, "pacs_stored_bytes") > 0
    assert value(after, "pacs_instances_by_modality", modality="CT") == 3
    assert value(after, "pacs_instances_received_total", modality="CT", calling_ae="CT_ROOM1",
                 source="dimse") == 3
    assert value(after, "pacs_audit_events_total", protocol="dicom", action="store", outcome="success") >= 1
    assert value(after, "pacs_audit_events_total", protocol="dicom", action="store", outcome="failure") >= 1
    newest = value(after, "pacs_last_instance_received_timestamp_seconds")
    assert newest is not None and newest >= sent_after - 1
    assert value(after, "pacs_routing_jobs", kind="dicom", destination="AI_NODE", state="dead") == 0
    # Pending, or being sent just now (the forwarder tries the AE again and again).
    assert value(after, "pacs_routing_oldest_job_age_seconds", destination="AI_NODE") >= 0
    cloud = [labels["destination"] for labels, _ in after["pacs_routing_jobs"] if labels["kind"] == "dicomweb"]
    assert set(cloud) == {f"http://127.0.0.1:{cloud[0].rsplit(':', 1)[1].split('/')[0]}/dicom-web"}, cloud

    # A signed report queues its ORU^R01 for the HIS (none configured: it waits).
    radiologist = server.make_token("bs.minh", "radiologist", "Trần^Minh")
    with server.http(radiologist) as http:
        assert http.put(f"/api/studies/{study}/report",
                        json={"findings": "Không thấy bất thường", "impression": "Bình thường"}).status_code == 200
        assert http.post(f"/api/studies/{study}/report/sign").status_code == 200
    signed = scrape(server, token)
    assert value(signed, "pacs_outbox_messages", destination="his", kind="report", state="pending") == 1
    assert value(signed, "pacs_outbox_messages", destination="his", kind="report", state="dead") == 0
    assert value(signed, "pacs_outbox_oldest_message_age_seconds", destination="his", state="pending") >= 0
    # The signed report's PDF is an instance too (source "report").
    assert value(signed, "pacs_instances") == 4
    assert value(signed, "pacs_http_requests_total", route="/api/studies/{study}/report/sign", method="POST",
                 status="200") == 1
    assert value(signed, "pacs_http_requests_total", route="/metrics", method="GET", status="200") >= 3
    assert value(signed, "pacs_http_request_duration_seconds_count", route="/metrics", method="GET") >= 3
    assert value(signed, "pacs_http_requests_in_flight") == 1  # this scrape

    # Nothing that names the patient or the study.
    text = signed["_text"][0][0]["text"]
    for secret in (PATIENT_ID, "OTHER-9", "Nguy", "NGUYEN", "ACC-MET-1", study, *uids, "bs.minh", "Minh",
                   "S3cr3t-pw", "k3y-s3cr3t", "pacs:"):
        assert secret not in text, secret


def test_who_may_scrape_and_what_the_audit_trail_keeps(tmp_path: Path) -> None:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {})).start()
    try:
        # A monitoring system's user and token, as an operator makes them.
        server.cli("user", "add", "zabbix", "--role", "monitor")
        token = json.loads(server.cli("token", "create", "zabbix", "--name", "agent", "--json").stdout)["token"]
        radiologist = server.make_token("bs.lan", "radiologist")
        with server.http(token) as monitor, server.http(radiologist) as reader, \
                server.http(token="none") as anonymous, server.http() as admin:
            for _ in range(3):
                assert monitor.get("/metrics").status_code == 200
            assert monitor.head("/metrics").status_code == 200
            assert admin.get("/metrics").status_code == 200
            assert monitor.get("/health").status_code == 200
            # Nothing else: no images, no worklist, not even the API's map.
            for path in ("/api/worklist", "/dicom-web/studies", "/fhir/Patient", "/docs", "/api/users"):
                assert monitor.get(path).status_code == 403, path
            for _ in range(2):
                assert reader.get("/metrics").status_code == 403
            for _ in range(3):
                refused = anonymous.get("/metrics")
                assert refused.status_code == 401
            assert httpx.get(f"http://127.0.0.1:{server.http_port}/metrics").status_code == 401
        server.cli("token", "revoke", "zabbix", "--name", "agent")
        with server.http(token) as revoked:
            assert revoked.get("/metrics").status_code == 401
        scrapes: list[dict] = []

        def written() -> bool:
            """The revoked token's refusal (the last request) is in the trail: so is every earlier
            one (pacs/audit.py: one queue, written in order). Not a fixed 1 s wait."""
            events = json.loads(server.cli("audit", "--format", "json").stdout)
            scrapes[:] = [e for e in events if "/metrics" in e.get("detail", "")]
            return any(e["user"] == "zabbix" and e["detail"].split(" -> ")[1][:3] == "401" for e in scrapes)

        assert wait_until(written, timeout=20, interval=0.2), scrapes
        # Successful scrapes are not audited; refusals are, once per client, user and status per period.
        assert all(e["outcome"] == "denied" for e in scrapes), scrapes
        by_user = {(e["user"], e["detail"].split(" -> ")[1][:3]) for e in scrapes}
        assert by_user == {("bs.lan", "403"), ("", "401"), ("zabbix", "401")}, scrapes
        assert len(scrapes) == 3, scrapes
    finally:
        server.stop()


def test_local_scrapes_without_a_token_when_allowed(tmp_path: Path) -> None:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_METRICS_LOCAL_UNAUTHENTICATED": "true"}).start()
    try:
        url = f"http://127.0.0.1:{server.http_port}"
        assert httpx.get(f"{url}/metrics").status_code == 200
        # Relayed by a proxy on this machine: not local.
        assert httpx.get(f"{url}/metrics", headers={"X-Forwarded-For": "10.0.0.7"}).status_code == 401
        # A token given is checked: a wrong one is refused, as elsewhere.
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        # Only /metrics: the rest of the API still wants a token.
        assert httpx.get(f"{url}/api/worklist").status_code == 401
    finally:
        server.stop()


def test_dicom_workers_associations_and_objects(tmp_path: Path) -> None:
    """With --dicom-workers 2 the associations are held, and the objects
    stored, by worker processes: the HTTP process still counts them."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_DICOM_WORKERS": "2", "PACS_METRICS_CACHE_SECONDS": "0"}).start()
    try:
        token = server.make_token("prometheus", "monitor")
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title) for _ in range(2)]
        try:
            assert all(a.is_established for a in held)
            assert wait_until(lambda: value(scrape(server, token), "pacs_dicom_associations_open") == 2, timeout=20)
        finally:
            for assoc in held:
                assoc.release()
        assert wait_until(lambda: value(scrape(server, token), "pacs_dicom_associations_open") == 0, timeout=20)
        scrape(server, token)  # the counters start here
        _study(tmp_path / "study", 4)
        assert server.storescu("+sd", str(tmp_path / "study"), calling="US_ROOM2").returncode == 0
        samples = scrape(server, token)
        assert value(samples, "pacs_instances_received_total", calling_ae="US_ROOM2") == 4
        assert value(samples, "pacs_instances") == 4
    finally:
        server.stop()


def test_counters_follow_rows_committed_out_of_key_order(pg_url: str) -> None:
    """PostgreSQL gives keys at insert and rows show at commit: a row whose
    transaction commits after a later key's is still counted once, and a
    key a rolled-back insert used up is passed after the lag."""
    from datetime import UTC, datetime

    from pacs.index import create_index_engine
    from pacs.index.models import AuditEvent
    from pacs.index.schema import prepare_schema
    from pacs.metrics.counters import IndexCounters
    from pacs.metrics.tail import LAG

    engine = create_index_engine(pg_url)
    try:
        prepare_schema(engine, upgrade=True)
        events = AuditEvent.__table__
        clock = [1000.0]
        counters = IndexCounters()
        for tail in counters._tails:
            tail.clock = lambda: clock[0]

        def event(conn, action: str) -> None:  # type: ignore[no-untyped-def]
            conn.execute(insert(events).values(at=datetime.now(UTC), action=action, protocol="dicom",
                                               outcome="success"))

        def counted(action: str) -> float:
            with engine.connect() as conn:
                counters.refresh(conn)
            return counters.events.counts.get(("dicom", action, "success"), 0.0)

        assert counted("store") == 0  # the first refresh notes where the table ends
        slow = engine.connect()
        slow_tx = slow.begin()
        event(slow, "store")  # takes the next key, commits last
        with engine.begin() as conn:
            event(conn, "store")
        assert counted("store") == 1
        slow_tx.commit()
        slow.close()
        assert counted("store") == 2
        assert counted("store") == 2  # never twice
        with engine.connect() as conn, conn.begin() as tx:  # a key used up, never committed
            event(conn, "query")
            tx.rollback()
        with engine.begin() as conn:
            event(conn, "query")
        assert counted("query") == 1
        clock[0] += LAG + 1
        assert counted("query") == 1
        floor = counters._tails[1].floor
        with engine.connect() as conn:
            top = conn.execute(events.select().order_by(events.c.pk.desc()).limit(1)).first()
        assert floor == top.pk  # passed the missing key
    finally:
        engine.dispose()
