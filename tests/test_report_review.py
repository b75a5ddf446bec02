"""Review of reporting: concurrent report writes on PostgreSQL (a save never
lands on a signed version, a lost race is a 409, never a 500), NUL in a
draft, the signed PDF (every page says whose it is, numbered; tabs; the
procedure's modalities), the image link only from public_url, FHIR search
audit per study and _count paging.

The races run the core in-process on a real PostgreSQL: a separate
connection holds a lock so that the two writers meet at the point that
matters, and the test waits until PostgreSQL shows them both waiting
(pg_stat_activity) before letting go: deterministic, no sleeps."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .conftest import Backend, PacsServer, free_port
from .pdftext import page_texts
from .peers import serving_with_his
from .qr_corpus import study_uid, write_corpus


# -- helpers ------------------------------------------------------------------------------------
@contextmanager
def _core(data_dir: Path, index_url: str | None, public_url: str | None = None) -> Iterator[Any]:
    from pacs.app import Pacs
    from pacs.settings import load_settings

    pacs = Pacs.open(load_settings(data_dir=data_dir, index_url=index_url, min_free_bytes=0, public_url=public_url))
    try:
        yield pacs
    finally:
        pacs.close()


def _ingest_ct(core: Any, tmp_path: Path) -> str:
    from pacs.ingest import Origin
    from pacs.part10 import FileSource

    from .dicomfiles import make_ct

    ct = make_ct(tmp_path / "ct.dcm")
    return str(core.ingestor.ingest(FileSource(ct), Origin("test")).header.study_uid)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _waiting(admin: psycopg.Connection, count: int) -> None:
    """Return once *count* other sessions of this database wait for a lock."""
    deadline = time.monotonic() + 30
    while True:
        waiting = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()").fetchone()[0]
        if waiting >= count:
            return
        assert time.monotonic() < deadline, f"{waiting} of {count} sessions reached their lock"
        time.sleep(0.01)  # polling PostgreSQL's view of the waiters, not timing a race


class _Call(threading.Thread):
    """A report call in a thread; its result or exception kept."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as exc:
            self.error = exc

    def outcome(self) -> int:
        """The HTTP status the API would answer (500 for anything but a ReportError)."""
        from pacs.reports import ReportError

        self.join(30)
        assert not self.is_alive()
        if self.error is None:
            return 200
        return self.error.http_status if isinstance(self.error, ReportError) else 500


def _race(pg_url: str, lock_sql: str, calls: list[Callable[[], Any]]) -> list[_Call]:
    """Run *calls* while another session holds *lock_sql*; let go once all
    of them wait on a lock (it or one another's)."""
    with psycopg.connect(_libpq(pg_url)) as locker, psycopg.connect(_libpq(pg_url), autocommit=True) as admin:
        locker.execute(lock_sql)
        threads = []
        for n, fn in enumerate(calls, start=1):
            threads.append(_Call(fn))
            threads[-1].start()
            _waiting(admin, n)  # in this order: the first call is the first to get past
        locker.commit()
    for thread in threads:
        thread.join(30)
    return threads


@pytest.fixture
def pg_core(tmp_path: Path, pg_url: str) -> Iterator[tuple[Any, str, str]]:
    """The core on a fresh PostgreSQL database with one CT study: (core, study, url)."""
    with _core(tmp_path / "data", pg_url) as core:
        yield core, _ingest_ct(core, tmp_path), pg_url


# -- 1, 2: concurrent writes on PostgreSQL --------------------------------------------------------
def test_a_save_racing_a_signature_never_lands_on_the_signed_version(pg_core: tuple[Any, str, str]) -> None:
    """The signature has updated the row and waits to queue its ORU (a busy
    outbox: another session holds it); a colleague's save from the same
    revision must then be refused, not written over the signed text."""
    from pacs.reports import ReportService

    core, study, url = pg_core
    service = ReportService(core)
    rev = service.save_draft(study, "Nốt mờ 8 mm thùy trên phổi phải.", "Nghi u phổi.", "bs.tung",
                             revision=0)["current"]["revision"]
    sign, save = _race(url, "LOCK TABLE outbound_messages IN EXCLUSIVE MODE", [
        lambda: service.sign(study, "bs.tung", revision=rev),
        lambda: service.save_draft(study, "Phổi bình thường.", "Không thấy bất thường.", "bs.lan", revision=rev),
    ])
    assert (sign.outcome(), save.outcome()) == (200, 409), (sign.error, save.error)
    report = service.get(study)
    assert [v["status"] for v in report["versions"]] == ["signed"]
    assert report["current"]["findings"] == "Nốt mờ 8 mm thùy trên phổi phải."
    assert report["current"]["revision"] == rev


def test_two_saves_from_one_revision_one_is_refused(pg_core: tuple[Any, str, str]) -> None:
    from pacs.reports import ReportService

    core, study, url = pg_core
    service = ReportService(core)
    rev = service.save_draft(study, "Bản đầu.", "Kết luận.", "bs.tung", revision=0)["current"]["revision"]
    first, second = _race(url, "LOCK TABLE reports IN SHARE ROW EXCLUSIVE MODE", [
        lambda: service.save_draft(study, "Bản của Tùng.", "Kết luận.", "bs.tung", revision=rev),
        lambda: service.save_draft(study, "Bản của Lan.", "Kết luận.", "bs.lan", revision=rev),
    ])
    assert sorted((first.outcome(), second.outcome())) == [200, 409], (first.error, second.error)
    winner = first if first.error is None else second
    current = service.get(study)["current"]
    assert current["findings"] == winner.result["current"]["findings"] and current["revision"] == rev + 1


def test_first_saves_racing_are_a_409_not_a_500(pg_core: tuple[Any, str, str]) -> None:
    """Both read "no report yet" and insert version 1: the loser was a 500
    (UniqueViolation uq_reports_study_pk_version)."""
    from pacs.reports import ReportService

    core, study, url = pg_core
    service = ReportService(core)
    first, second = _race(url, "LOCK TABLE reports IN SHARE MODE", [
        lambda: service.save_draft(study, "Bản của Tùng.", "Kết luận.", "bs.tung", revision=0),
        lambda: service.save_draft(study, "Bản của Lan.", "Kết luận.", "bs.lan", revision=0),
    ])
    assert sorted((first.outcome(), second.outcome())) == [200, 409], (first.error, second.error)
    assert len(service.get(study)["versions"]) == 1


def test_amendments_racing_are_a_409_not_a_500(pg_core: tuple[Any, str, str]) -> None:
    from pacs.reports import ReportService

    core, study, url = pg_core
    service = ReportService(core)
    service.save_draft(study, "Bình thường.", "Bình thường.", "bs.tung")
    service.sign(study, "bs.tung")
    first, second = _race(url, "LOCK TABLE reports IN SHARE MODE", [
        lambda: service.amend(study, "bs.tung"),
        lambda: service.amend(study, "bs.lan"),
    ])
    assert sorted((first.outcome(), second.outcome())) == [200, 409], (first.error, second.error)
    assert [v["status"] for v in service.get(study)["versions"]] == ["signed", "draft"]


# -- 7: NUL -----------------------------------------------------------------------------------------
def test_a_draft_with_nul_is_a_400_and_the_saved_draft_kept(pg_core: tuple[Any, str, str]) -> None:
    from pacs.reports import ReportError, ReportService

    core, study, _ = pg_core
    service = ReportService(core)
    service.save_draft(study, "Tràn dịch màng phổi.", "Kết luận.", "bs.tung")
    for findings, impression in (("Tràn dịch màng phổi \x00", "Kết luận."), ("Tràn dịch.", "\x00")):
        with pytest.raises(ReportError) as refused:
            service.save_draft(study, findings, impression, "bs.tung")
        assert refused.value.http_status == 400 and "NUL" in str(refused.value)
    assert service.get(study)["current"]["findings"] == "Tràn dịch màng phổi."


# -- 4, 5: the signed PDF and the image link ---------------------------------------------------------
def test_every_page_of_a_long_report_names_the_patient_and_its_number() -> None:
    from pacs.report_pdf import ReportContent, render

    findings = "Tổn thương\tkích thước 3 cm.\n" + "\n".join(
        f"{i}. Vùng {i}: không thấy bất thường, cấu trúc giải phẫu bình thường." for i in range(1, 91))
    pages = page_texts(render(ReportContent(
        institution="BV Đa khoa", patient_name="Nguyễn^Văn An", patient_id="001085012345", birth_date="19850101",
        sex="M", study_date="20240115", accession="ACC002", description="CT toàn thân", modalities="CT",
        findings=findings, impression="Nghi ngờ khối u gan phải 3 cm.", signed_by="Đỗ^Thanh Tùng",
        signed_at="2024-01-15 10:00 (UTC+07:00)", version=1, viewer_url="")))
    assert len(pages) >= 3
    for n, text in enumerate(pages, start=1):
        assert "Nguyễn Văn An" in text and "001085012345" in text and "ACC002" in text, (n, text[:300])
        assert f"Trang / Page {n}/{len(pages)}" in text, (n, text[-300:])
    assert "Tổn thương    kích thước 3 cm." in pages[0]  # the tab as spaces, not dropped


def _payloads(core: Any) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from pacs.index.models import OutboundMessage

    table = OutboundMessage.__table__
    with core.engine.connect() as conn:
        rows = conn.execute(select(table.c.payload).where(table.c.kind == "report").order_by(table.c.pk)).all()
    return [json.loads(row.payload) for row in rows]


def test_an_amended_pdf_names_the_procedure_not_the_first_reports_pdf(pg_core: tuple[Any, str, str]) -> None:
    from pacs.reports import ReportService

    core, study, _ = pg_core
    service = ReportService(core)
    service.save_draft(study, "Bình thường.", "Bình thường.", "bs.tung")
    service.sign(study, "bs.tung")  # the study now holds the PDF, a DOC series
    service.amend(study, "bs.tung")
    service.save_draft(study, "Bổ sung: nốt mờ 3 mm.", "Theo dõi.", "bs.tung")
    service.sign(study, "bs.tung")
    text = "\n".join(page_texts(service.pdf(study)))
    procedure = [line for line in text.splitlines() if line.startswith("Kỹ thuật")]
    following = text.splitlines()[text.splitlines().index(procedure[0]) + 1]
    assert following.split()[0] == "CT" and "DOC" not in following, following
    assert [p["modalities"] for p in _payloads(core)] == ["CT", "CT"]


def test_image_link_only_from_public_url(tmp_path: Path) -> None:
    """No public_url: the signed PDF and the ORU carry no link (a relative
    one is useless to the HIS); with it, its address, whatever the request."""
    from pacs.reports import ReportService

    for public_url in (None, "https://pacs.bvdk.vn/"):
        data = tmp_path / ("with" if public_url else "without")
        with _core(data, None, public_url) as core:
            study = _ingest_ct(core, data)
            service = ReportService(core)
            service.save_draft(study, "Bình thường.", "Bình thường.", "bs.tung")
            service.sign(study, "bs.tung")
            text = "\n".join(page_texts(service.pdf(study)))
            links = [line for line in _payloads(core)[0]["lines"] if line["type"] == "RP"]
        if public_url:
            link = f"https://pacs.bvdk.vn/viewer/study/{study}"
            assert f"Xem ảnh / Images: {link}" in text and [x["value"] for x in links] == [link]
        else:
            assert "Xem ảnh" not in text and "/viewer/study" not in text and links == []


# -- 3, 5, 6 over HTTP: a forged Host, the FHIR search audit, _count -----------------------------------
@pytest.fixture
def reporting(tmp_path: Path) -> Iterator[PacsServer]:
    his_port = free_port()
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}"})
    write_corpus(tmp_path / "corpus")
    server.cli("import", str(tmp_path / "corpus"))
    with serving_with_his(server, his_port, ("bs.tung", "Đỗ^Thanh Tùng")) as serving:
        yield serving


def test_fhir_searches_audit_each_study_shown_and_cap_count(reporting: PacsServer) -> None:
    s1, s2 = study_uid("S1"), study_uid("S2")
    emr = reporting.make_token("emr", "emr", "EMR")
    with reporting.http(token=reporting.radiologist) as rad:  # type: ignore[attr-defined]
        for study in (s1, s2):
            rad.put(f"/api/studies/{study}/report", json={"findings": "Bình thường.", "impression": "Bình thường."})
            # A forged Host goes nowhere near the signed document (no public_url here).
            signed = rad.post(f"/api/studies/{study}/report/sign", headers={"Host": "evil.example"})
            assert signed.status_code == 200, signed.text
        pdf = rad.get(f"/api/studies/{s1}/report/pdf").content
    assert "evil.example" not in "\n".join(page_texts(pdf))
    oru = [m.decode() for m in reporting.his.wait_for(2, timeout=30) if b"ORU^R01" in m]  # type: ignore[attr-defined]
    assert len(oru) == 2 and not any("evil.example" in m or "/viewer/study" in m for m in oru)

    with reporting.http(token=emr) as http:
        by_patient = {"patient.identifier": "CCCD|001085012345"}
        for path in ("/fhir/DiagnosticReport", "/fhir/ImagingStudy"):
            found = http.get(path, params={**by_patient, "_count": 500})
            assert found.status_code == 200, found.text
            body = found.json()
            assert body["total"] == 2 and len(body["entry"]) == 2
            assert "_count=200" in body["link"][0]["url"]  # the page size given
            counted = http.get(path, params={**by_patient, "_count": 0}).json()
            assert counted["total"] == 2 and "entry" not in counted
            assert [link["relation"] for link in counted["link"]] == ["self"]
            assert http.get(path, params={**by_patient, "_count": -1}).status_code == 400
        counted = http.get("/fhir/Patient", params={"name": "nguyen", "_count": 0}).json()
        assert counted["total"] >= 1 and "entry" not in counted

    with reporting.http() as admin:
        for study in (s1, s2):
            events = admin.get("/api/audit", params={"study": study, "user": "emr"}).json()
            searched = [e for e in events if e["action"] == "query" and e["outcome"] == "success"]
            # Each search that showed it (DiagnosticReport, ImagingStudy), not the counts alone.
            assert len(searched) == 2 and {e["patient_id"] for e in searched} == {"001085012345^^^CCCD"}, events
    by_patient_cli = json.loads(reporting.cli("audit", "--patient", "001085012345", "--user", "emr",
                                              "--format", "json").stdout)
    assert {e["study_uid"] for e in by_patient_cli if e["action"] == "query"} >= {s1, s2}
    assert json.loads(reporting.cli("audit", "--patient", "00108501234", "--format", "json").stdout) == []
