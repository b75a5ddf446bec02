"""Dates, times and time zones end to end (an exploratory tester's findings).

Vietnam is UTC+7; servers and containers often run in UTC. Instants are kept
in UTC and given out with their offset; what is written for people and peers
(DICOM DA/TM, HL7 timestamps, FHIR dateTimes, the PDF's signature line,
"today") is in the hospital's zone, the ``timezone`` setting (PACS_TIMEZONE).

A server in UTC for a Vietnamese hospital is a real ``pacs serve`` with
TZ=UTC and PACS_TIMEZONE=Asia/Ho_Chi_Minh, compared with one on
TZ=Asia/Ho_Chi_Minh alone (PostgreSQL, so both indexes are covered). No
test asserts a wall-clock time: produced times are compared with instants
measured around the action, within seconds or minutes.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from .conftest import PACS, Backend, PacsServer, free_port
from .dicomfiles import make_ct
from .pdftext import page_texts
from .peers import create_database, drop_database, serving_with_his, wait_until
from .qr_corpus import study_uid, write_corpus
from .test_hl7_robustness import fields, send_raw

VN = "Asia/Ho_Chi_Minh"
S1 = study_uid("S1")  # the corpus's CT: StudyDate 20240115, StudyTime 083000
S1_STARTED = "2024-01-15T08:30:00+07:00"
WARNING = "the server's time zone is UTC and PACS_TIMEZONE is not set"


# -- servers (module-scoped: each start costs seconds) -----------------------------------------
@pytest.fixture(scope="module")
def utc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """A server whose clock is UTC, for a hospital in Vietnam (PACS_TIMEZONE),
    SQLite; a stand-in HIS receives its HL7; a routing rule sends report
    PDFs to an address that refuses, so `pacs route list` has a job."""
    base = tmp_path_factory.mktemp("tz-utc")
    his_port = free_port()
    server = PacsServer(base / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"TZ": "UTC", "PACS_TIMEZONE": VN, "PACS_HIS_MLLP": f"127.0.0.1:{his_port}"})
    write_corpus(base / "corpus")
    server.cli("import", str(base / "corpus"))
    server.cli("route", "add", "nowhere", "--if", "Modality=DOC", "--to-url", "http://127.0.0.1:9/dicom-web")
    with serving_with_his(server, his_port, ("bs.tung", "Đỗ^Thanh Tùng")) as serving:
        yield serving


@pytest.fixture(scope="module")
def vn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """A server whose own clock is Vietnam's (TZ alone, no PACS_TIMEZONE), PostgreSQL."""
    base = tmp_path_factory.mktemp("tz-vn")
    pg = create_database()
    server = PacsServer(base / "data", Backend("pg", pg, None, {}), extra_env={"TZ": VN})
    write_corpus(base / "corpus")
    server.cli("import", str(base / "corpus"))
    server.start()
    server.radiologist = server.make_token("bs.lan", "radiologist", "Trần^Thị Lan")  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        drop_database(pg)


@pytest.fixture(scope="module")
def signed(utc_server: PacsServer) -> dict[str, Any]:
    """The corpus's S1 reported and signed on the UTC server; the instants
    around the signature."""
    before = datetime.now(UTC)
    with utc_server.http(token=utc_server.radiologist) as rad:  # type: ignore[attr-defined]
        draft = rad.put(f"/api/studies/{S1}/report", json={"findings": "Phổi sáng đều.", "impression": "Bình thường."})
        assert draft.status_code == 200, draft.text
        done = rad.post(f"/api/studies/{S1}/report/sign")
        assert done.status_code == 200, done.text
    return {"report": done.json()["current"], "before": before, "after": datetime.now(UTC)}


def _aware(text: str) -> datetime:
    """An ISO instant that must say its offset."""
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() is not None, f"{text!r} has no offset: read as local time it is hours off"
    return moment


def _between(moment: datetime, before: datetime, after: datetime, slack: float = 2.0) -> bool:
    return before - timedelta(seconds=slack) <= moment <= after + timedelta(seconds=slack)


def _cli(server: PacsServer, *args: str) -> str:
    """A `pacs` command on *server*'s archive, wide enough that table cells are not folded."""
    result = subprocess.run([PACS, *args, *server.common_args()], capture_output=True, text=True, timeout=120,
                            env={**server.env, "COLUMNS": "400"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# -- 1: instants the index gives back -----------------------------------------------------------
@pytest.mark.parametrize("index", ["sqlite", "pg"])
def test_index_keeps_instants_in_utc_and_gives_them_back_aware(index: str, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    from pacs.index import create_index_engine, upgrade_schema
    from pacs.index.models import AuditEvent

    url = request.getfixturevalue("pg_url") if index == "pg" else f"sqlite:///{tmp_path}/index.sqlite"
    engine = create_index_engine(url)
    events = AuditEvent.__table__
    in_hanoi = datetime(2026, 12, 5, 1, 30, tzinfo=ZoneInfo(VN))  # 2026-12-04 18:30 UTC
    try:
        upgrade_schema(engine)
        with engine.begin() as conn:
            conn.execute(events.insert().values(action="view", at=in_hanoi))
        with engine.connect() as conn:
            back = conn.execute(select(events.c.at)).scalar_one()
            # Compared by instant, whatever the zone of the value bound.
            earlier = conn.execute(select(func.count()).select_from(events).where(
                events.c.at < datetime(2026, 12, 4, 18, 31, tzinfo=UTC))).scalar_one()
    finally:
        engine.dispose()
    assert back.utcoffset() == timedelta(0), f"{back!r} is not an aware UTC instant"
    assert back == in_hanoi
    assert earlier == 1


def test_api_times_carry_their_offset(utc_server: PacsServer, signed: dict[str, Any], vn_server: PacsServer) -> None:
    report = signed["report"]
    for key in ("created_at", "updated_at", "signed_at"):
        assert _between(_aware(report[key]), signed["before"], signed["after"]), (key, report[key])
    with utc_server.http() as http:
        events = http.get("/api/audit", params={"limit": 5}).json()
    assert events and all(abs(_aware(e["at"]) - datetime.now(UTC)) < timedelta(minutes=10) for e in events)
    # PostgreSQL (a server on Vietnam's clock): the same instants, the same offsets.
    before = datetime.now(UTC)
    with vn_server.http(token=vn_server.radiologist) as rad:  # type: ignore[attr-defined]
        draft = rad.put(f"/api/studies/{study_uid('S2')}/report", json={"findings": "Bình thường."}).json()
    assert _between(_aware(draft["current"]["created_at"]), before, datetime.now(UTC))


def test_cli_exports_and_tables_say_their_zone(utc_server: PacsServer, signed: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    syslog = _cli(utc_server, "audit", "--format", "syslog", "--limit", "5").splitlines()
    assert syslog
    for line in syslog:  # RFC 5424 6.2.3: TIMESTAMP with its TIME-OFFSET
        stamp = re.match(r"<85>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) ", line)
        assert stamp, line
        assert abs(_aware(stamp.group(1)) - now) < timedelta(minutes=10)
    atna = json.loads(_cli(utc_server, "audit", "--format", "atna", "--limit", "5"))
    assert all(abs(_aware(e["EventIdentification"]["EventDateTime"]) - now) < timedelta(minutes=10) for e in atna)
    plain = json.loads(_cli(utc_server, "audit", "--format", "json", "--limit", "5"))
    assert all(abs(_aware(e["at"]) - now) < timedelta(minutes=10) for e in plain)

    outbox = json.loads(_cli(utc_server, "outbox", "list", "--json"))["messages"]
    assert outbox and all(abs(_aware(m["created_at"]) - now) < timedelta(minutes=10) for m in outbox)
    # Tables: the hospital's time with its offset, not UTC printed bare.
    assert "+0700" in _cli(utc_server, "outbox", "list")
    assert wait_until(lambda: "+0700" in _cli(utc_server, "route", "list"), timeout=20)


# -- 2: the signed report's PDF instance and its text ---------------------------------------------
def test_signed_report_pdf_is_dated_in_the_hospital_zone(utc_server: PacsServer, signed: dict[str, Any]) -> None:
    signed_at = _aware(signed["report"]["signed_at"])
    core = utc_server.core()
    try:
        stored = core.reader.stored_instance(signed["report"]["pdf_sop_uid"])
        ds = dcmread(io.BytesIO(core.store.read_bytes(stored.storage_key)))
    finally:
        core.close()
    assert ds.TimezoneOffsetFromUTC == "+0700"  # PS3.3 C.12.1.1.8: which local time the others are
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == (ds.ContentDate, ds.ContentTime)
    assert ds.AcquisitionDateTime == ds.ContentDate + ds.ContentTime
    content = datetime.strptime(ds.ContentDate + ds.ContentTime + ds.TimezoneOffsetFromUTC, "%Y%m%d%H%M%S%z")
    assert abs(content - signed_at) < timedelta(seconds=2)

    text = "\n".join(page_texts(bytes(ds.EncapsulatedDocument)))
    line = next((row for row in text.splitlines() if "Signed:" in row), None)
    assert line is not None, text
    shown = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d) \(UTC\+07:00\)$", line)
    assert shown, line
    on_the_page = datetime.strptime(shown.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=ZoneInfo(VN))
    assert timedelta(0) <= signed_at - on_the_page < timedelta(minutes=1)


# -- 5: outbound HL7 -----------------------------------------------------------------------------
def test_oru_timestamps_are_in_the_hospital_zone_with_offset(utc_server: PacsServer,
                                                             signed: dict[str, Any]) -> None:
    def oru() -> list[bytes]:
        return [m for m in utc_server.his.messages if b"ORU^R01" in m and b"ACC001" in m]  # type: ignore[attr-defined]

    assert wait_until(lambda: bool(oru()), timeout=30)
    message = oru()[0]
    msh7 = fields(message, "MSH")[6]
    assert re.fullmatch(r"\d{14}\+0700", msh7), msh7
    assert abs(datetime.strptime(msh7, "%Y%m%d%H%M%S%z") - datetime.now(UTC)) < timedelta(minutes=5)
    obr = fields(message, "OBR")
    assert re.fullmatch(r"\d{14}\+0700", obr[22]), obr[22]
    signed_at = _aware(signed["report"]["signed_at"])
    assert abs(datetime.strptime(obr[22], "%Y%m%d%H%M%S%z") - signed_at) < timedelta(seconds=1)
    assert obr[7] == "20240115083000+0700"  # the study's local time, and which local that is


# -- 3: FHIR -------------------------------------------------------------------------------------
def test_fhir_reads_study_times_in_the_hospital_zone(utc_server: PacsServer, vn_server: PacsServer,
                                                     signed: dict[str, Any]) -> None:
    for server in (utc_server, vn_server):
        with server.http() as http:
            study = http.get(f"/fhir/ImagingStudy/{S1}").json()
            assert study["started"] == S1_STARTED, (server.extra_env, study.get("started"))
    with utc_server.http() as http:
        report = http.get("/fhir/DiagnosticReport", params={"identifier": "ACC001"}).json()["entry"][0]["resource"]
    assert report["effectiveDateTime"] == S1_STARTED  # the examination's time
    assert abs(_aware(report["issued"]) - _aware(signed["report"]["signed_at"])) < timedelta(seconds=1)


# -- 4: inbound HL7 ------------------------------------------------------------------------------
# TQ1-7 as a HIS sends it -> the step's DICOM (ScheduledProcedureStepStartDate, StartTime) in Vietnam.
SCHEDULED = {
    "A": ("20261204183000+0000", "20261205", "013000"),  # a HIS on UTC: the next day in Vietnam
    "B": ("20261205013000", "20261205", "013000"),  # no offset: local already
    "C": ("202612050600+0700", "20261205", "0600"),  # Vietnam's own offset, minutes precision kept
    "D": ("20261204200000-0500", "20261205", "080000"),
    "E": ("20261205", "20261205", "000000"),  # a date alone is not shifted; due from the day's start
}


def _orm(control: str, accession: str, patient: str, start: str) -> bytes:
    segments = [
        f"MSH|^~\\&|HIS|BV|FILMLESS|BV|20261205013000||ORM^O01^ORM_O01|{control}|P|2.5|||||VN|UNICODE UTF-8",
        # 23:30 in UTC-5 is the next day in Vietnam: a birth date must never move.
        f"PID|1||{patient}^^^BV^MR||NGUYEN^VAN TZ||198001012330-0500|M",
        f"ORC|NW|P{accession}|F{accession}||SC",
        f"OBR|1|P{accession}|F{accession}|CT001^CT NGUC^L||||||||||||||{accession}|RP{accession}|S{accession}||||CT",
        f"TQ1|1||||||{start}|||R",
    ]
    return "\r".join(segments).encode()


def test_hl7_scheduled_times_with_an_offset_become_local(utc_server: PacsServer, vn_server: PacsServer) -> None:
    for prefix, server in (("TU", utc_server), ("TV", vn_server)):
        patient = f"{prefix}P1"
        for key, (start, _, _) in SCHEDULED.items():
            before = datetime.now(UTC)
            ack = send_raw(server, _orm(f"{prefix}{key}", f"{prefix}{key}", patient, start))
            assert fields(ack, "MSA")[1] == "AA", ack
            msh7 = fields(ack, "MSH")[6]  # the ACK's own time: Vietnam's, with the offset
            assert re.fullmatch(r"\d{14}\+0700", msh7), msh7
            assert _between(datetime.strptime(msh7, "%Y%m%d%H%M%S%z"), before.replace(microsecond=0),
                            datetime.now(UTC))
        with server.http() as http:
            for key, (start, day, clock) in SCHEDULED.items():
                order = http.get(f"/api/orders/{prefix}{key}").json()
                assert (order["start_date"], order["start_time"]) == (day, clock), (prefix, start, order)
                assert _between(_aware(order["created_at"]), datetime.now(UTC) - timedelta(minutes=5),
                                datetime.now(UTC))
        core = server.core()
        try:
            from pacs.index.models import Patient

            with core.engine.connect() as conn:
                birth = conn.execute(select(Patient.birth_date).where(Patient.patient_id == patient)).scalar_one()
        finally:
            core.close()
        assert birth == "19800101"


def test_an_order_without_a_scheduled_time_is_scheduled_when_it_came(utc_server: PacsServer) -> None:
    """No TQ1-7, OBR-27 or OBR-7: scheduled at its arrival in the hospital's
    day (a modality asking for today's steps never saw it); a later change
    without a date keeps it."""
    before = datetime.now(ZoneInfo(VN))
    message = _orm("TNOW", "TNOW", "TNOWP", "").split(b"\rTQ1")[0]
    assert b"TQ1" not in message
    assert fields(send_raw(utc_server, message), "MSA")[1] == "AA"
    after = datetime.now(ZoneInfo(VN))
    with utc_server.http() as http:
        order = http.get("/api/orders/TNOW").json()
        arrived = datetime.strptime(order["start_date"] + order["start_time"], "%Y%m%d%H%M%S").replace(tzinfo=ZoneInfo(VN))
        assert _between(arrived, before.replace(microsecond=0), after), (order, before, after)
        change = message.replace(b"ORC|NW|", b"ORC|XO|").replace(b"|TNOW|P|", b"|TNOW2|P|")
        assert fields(send_raw(utc_server, change), "MSA")[1] == "AA"
        again = http.get("/api/orders/TNOW").json()
        assert (again["start_date"], again["start_time"]) == (order["start_date"], order["start_time"])


# -- 7: "today" of purge and pull ------------------------------------------------------------------
def _far_zone() -> str:
    """A zone whose date differs from the server's own now (UTC+14 and UTC-12
    are 26 hours apart: one of them is always on another day)."""
    for zone in ("Pacific/Kiritimati", "Etc/GMT+12"):
        if datetime.now(ZoneInfo(zone)).date() != datetime.now(UTC).date():
            return zone
    raise AssertionError("unreachable: two zones 26 hours apart share a date")


def test_purge_counts_days_from_the_hospitals_today(tmp_path: Path) -> None:
    zone = _far_zone()
    today = datetime.now(ZoneInfo(zone)).date()
    yesterday = today - timedelta(days=1)
    files = tmp_path / "in"
    files.mkdir()
    uids = {}
    for name, day in (("today", today), ("yesterday", yesterday)):
        path = make_ct(files / f"{name}.dcm", StudyDate=day.strftime("%Y%m%d"), StudyTime="120000")
        uids[name] = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    archive = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                         extra_env={"TZ": "UTC", "PACS_TIMEZONE": zone})
    archive.cli("import", str(files))
    dry = json.loads(archive.cli("purge", "--older-than", "0", "--json").stdout)
    # Older than 0 days: yesterday's study, not today's -- the hospital's days, not UTC's.
    assert {s["study_uid"] for s in dry["studies"]["items"]} == {uids["yesterday"]}


def test_pull_until_and_stop_at_follow_the_hospitals_clock() -> None:
    from pacs.pull import PullOptions, Puller
    from pacs.settings import Settings

    zone = ZoneInfo(_far_zone())
    now = datetime.now(zone)
    in_an_hour = (now + timedelta(hours=1)).time().replace(second=0, microsecond=0)
    pacs = SimpleNamespace(settings=Settings(timezone=str(zone)))  # the constructor reads only the settings
    puller = Puller(pacs, "OLDPACS", PullOptions(stop_at=in_an_hour))  # type: ignore[arg-type]
    assert puller.until == now.date()  # the default --until: the hospital's today
    assert puller.report.until == now.strftime("%Y%m%d")
    deadline = puller._deadline
    assert deadline is not None
    # --stop-at HH:MM: the next time the hospital's clock shows it, an hour from now.
    assert timedelta(minutes=58) <= deadline - datetime.now(UTC) <= timedelta(hours=1)
    assert deadline.astimezone(zone).time() == in_an_hour
    assert puller._should_stop() == ""
    given = Puller(pacs, "OLDPACS", PullOptions(until=date(2024, 1, 1)))  # type: ignore[arg-type]
    assert given.until == date(2024, 1, 1) and given._deadline is None


# -- 8: the start-up warning -----------------------------------------------------------------------
def test_serve_warns_once_when_the_zone_is_utc_and_unset(tmp_path: Path, utc_server: PacsServer,
                                                          vn_server: PacsServer) -> None:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={"TZ": "UTC"})
    server.token = "unused"  # no user needed: the warning is all this server is for
    server.start()
    try:
        assert wait_until(lambda: WARNING in server.log_text(), timeout=10)
    finally:
        server.stop()
    assert server.log_text().count(WARNING) == 1
    # Configured (PACS_TIMEZONE) or on Vietnam's clock: no warning.
    assert WARNING not in utc_server.log_text() and WARNING not in vn_server.log_text()
