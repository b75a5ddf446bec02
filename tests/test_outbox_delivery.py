"""The HL7 outbox to the HIS: a message is never dropped (AR is retried
for as long as it takes, a dead AE message can be seen and sent again by an
operator), and the messages about one order or study reach the HIS in the
order they were queued, without holding back those of other orders."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from .conftest import Backend, PacsServer, free_port
from .peers import MLLPRecorder, ack_for, wait_until
from .qr_corpus import study_uid, write_corpus


@dataclass
class Received:
    at: float
    message: str
    answer: str

    def field(self, segment: str, index: int) -> str:
        for line in self.message.split("\r"):
            if line.startswith(segment + "|"):
                fields = line.split("|")
                return fields[index] if index < len(fields) else ""
        return ""


class ScriptedHIS(MLLPRecorder):
    """A stand-in HIS over real MLLP that answers each message with what
    ``answer(message)`` says (AA, AE, AR; CLOSE hangs up without an ACK)
    and records it all, in order."""

    def __init__(self, port: int, answer: Callable[[str], str] = lambda m: "AA") -> None:
        self.answer = answer
        self.received: list[Received] = []
        super().__init__(port)

    def reply(self, message: bytes) -> bytes | None:
        text = message.decode()
        code = self.answer(text)
        self.received.append(Received(time.monotonic(), text, code))
        return None if code == "CLOSE" else ack_for(message, code, "scripted")

    def about(self, accession: str, kind: str = "ORU^R01") -> list[Received]:
        return [r for r in self.received if kind in r.message and f"|{accession}|" in r.message]


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[PacsServer, ScriptedHIS]]:
    his_port = free_port()
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}", "PACS_HIS_RETRY_SECONDS": "0.1"})
    write_corpus(tmp_path / "corpus")
    server.cli("import", str(tmp_path / "corpus"))
    server.start()
    his = ScriptedHIS(his_port)
    server.radiologist = server.make_token("bs.tung", "radiologist", "Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
    try:
        yield server, his
    finally:
        his.stop()
        server.stop()


def _sign(server: PacsServer, study: str, findings: str, *, amend: bool = False) -> None:
    with server.http(token=server.radiologist) as rad:  # type: ignore[attr-defined]
        if amend:
            assert rad.post(f"/api/studies/{study}/report/amend").status_code == 200
        assert rad.put(f"/api/studies/{study}/report", json={"findings": findings, "impression": "Kết luận."}
                       ).status_code == 200
        signed = rad.post(f"/api/studies/{study}/report/sign")
        assert signed.status_code == 200, signed.text


def _status(r: Received) -> str:
    return r.field("OBR", 25)


def test_later_messages_of_a_study_wait_for_the_earlier_one(serving: tuple[PacsServer, ScriptedHIS]) -> None:
    """The HIS answers AR to the first report of ACC002 three times; its
    amendment (C), signed meanwhile, must not overtake it (the HIS would end
    with the final text shown as current), while another study's report
    goes out at once."""
    server, his = serving
    refusals = {"left": 3}

    def answer(message: str) -> str:
        if "|ACC002|" in message and "ORU^R01" in message and "Bản đầu" in message and refusals["left"]:
            refusals["left"] -= 1
            return "AR"
        return "AA"

    his.answer = answer
    _sign(server, study_uid("S2"), "Bản đầu.")
    assert wait_until(lambda: len(his.about("ACC002")) >= 1, timeout=30), his.received
    _sign(server, study_uid("S2"), "Bản sửa.", amend=True)
    _sign(server, study_uid("S1"), "Nghiên cứu khác.")
    assert wait_until(lambda: any(r.answer == "AA" and _status(r) == "C" for r in his.about("ACC002")),
                      timeout=60), his.received

    acc002 = his.about("ACC002")
    assert [(_status(r), r.answer) for r in acc002] == [("F", "AR")] * 3 + [("F", "AA"), ("C", "AA")]
    first_accepted = next(r for r in acc002 if r.answer == "AA")
    other = his.about("ACC001")
    assert [r.answer for r in other] == ["AA"]
    assert other[0].at < first_accepted.at  # another order does not wait
    # The ARs were resent (same MSH-10), not parked: nothing is dead.
    assert len({r.field("MSH", 9) for r in acc002 if _status(r) == "F"}) == 1
    listed = json.loads(server.cli("outbox", "list", "--json").stdout)
    assert listed["counts"] == {"sent": 3}


def test_a_dead_message_is_listed_retried_and_superseded(serving: tuple[PacsServer, ScriptedHIS]) -> None:
    """AE (the HIS says the message is wrong) parks a message dead after a
    few answers: `pacs stats` and `pacs outbox list` show it, it holds back
    nothing, `pacs outbox retry` (audited) sends it again; a dead report
    that a later version reached the HIS over is superseded, never resent."""
    server, his = serving
    reject = {"ACC001": True}
    his.answer = lambda m: "AE" if reject["ACC001"] and "|ACC001|" in m else "AA"

    def dead() -> list[dict]:
        return json.loads(server.cli("outbox", "list", "--state", "dead", "--json").stdout)["messages"]

    _sign(server, study_uid("S1"), "Bản đầu.")
    assert wait_until(lambda: len(dead()) == 1, timeout=60), his.received
    parked = dead()[0]
    assert parked["kind"] == "report" and parked["accession"] == "ACC001" and parked["status"] == "final"
    assert "AE" in parked["last_error"] and parked["attempts"] == 3
    assert [r.answer for r in his.about("ACC001")] == ["AE"] * 3
    stats = json.loads(server.cli("stats", "--json").stdout)
    assert stats["queues"]["outbox"]["dead"] == 1
    assert "dead" in server.cli("outbox", "list").stdout

    # The HIS is fixed; the operator sends it again.
    reject["ACC001"] = False
    retried = json.loads(server.cli("outbox", "retry", "--all-dead", "--json").stdout)
    assert retried == {"retried": [parked["id"]]}
    assert wait_until(lambda: [r.answer for r in his.about("ACC001")] == ["AE"] * 3 + ["AA"], timeout=30)
    assert dead() == []
    again = server.cli("outbox", "retry", "--id", str(parked["id"]), check=False)
    assert again.returncode == 1 and "not dead" in again.stderr
    missing = server.cli("outbox", "retry", "--id", "999999", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    audit = json.loads(server.cli("audit", "--format", "json").stdout)
    assert any(e["action"] == "outbox-retry" and str(parked["id"]) in e["detail"] for e in audit)

    # A dead amendment does not hold back the next one, which supersedes it.
    reject["ACC001"] = True
    _sign(server, study_uid("S1"), "Bản sửa 1.", amend=True)
    assert wait_until(lambda: len(dead()) == 1, timeout=60)
    reject["ACC001"] = False
    _sign(server, study_uid("S1"), "Bản sửa 2.", amend=True)
    assert wait_until(lambda: any("Bản sửa 2" in r.message and r.answer == "AA" for r in his.about("ACC001")),
                      timeout=30)
    assert wait_until(lambda: dead() == [], timeout=10)
    superseded = json.loads(server.cli("outbox", "list", "--state", "superseded", "--json").stdout)["messages"]
    assert len(superseded) == 1 and "superseded" in superseded[0]["last_error"]
    assert json.loads(server.cli("outbox", "retry", "--all-dead", "--json").stdout) == {"retried": []}
    time.sleep(2)
    assert not any("Bản sửa 1" in r.message and r.answer == "AA" for r in his.about("ACC001"))


# -- the sender itself, on a real database and a real MLLP HIS, its clock pushed ----------------
def _order_status(pk: int, accession: str, status: str) -> dict:
    return {"order": {"pk": pk, "accession_number": accession, "patient_id": "BN1", "issuer": "BVDK",
                      "name": "Nguyễn^Văn An", "placer_order_number": f"P{accession}",
                      "filler_order_number": f"F{accession}", "procedure_code": "CT01",
                      "requested_procedure_description": "CT ngực", "procedure_code_scheme": "L"},
            "status": status}


@pytest.fixture(params=["sqlite", "postgresql"])
def sender(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[object, ScriptedHIS]]:
    """An OutboundSender (not started: the test drives its rounds) on SQLite
    or PostgreSQL, and a scripted HIS it delivers to."""
    from ris_bridge.outbound import OutboundSender

    from .fuzzing import core_on
    from .peers import create_database, drop_database

    index_url = None
    if request.param == "postgresql":
        try:
            index_url = create_database()
        except Exception as exc:  # noqa: BLE001 - no PostgreSQL here
            pytest.skip(f"PostgreSQL not available: {exc}")
    port = free_port()
    his = ScriptedHIS(port)
    try:
        with core_on(tmp_path / "data", index_url) as core:
            yield OutboundSender(core, "127.0.0.1", port), his
    finally:
        his.stop()
        if index_url:
            drop_database(index_url)


def _enqueue(core: object, kind: str, data: dict) -> None:
    from pacs.orders import OrderService

    with core.engine.begin() as conn:  # type: ignore[attr-defined]
        OrderService.enqueue(conn, "his", kind, data)


def _time_passes(core: object) -> None:
    """Every backoff is over (instead of waiting for it)."""
    from pacs.outbox import outbox

    with core.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(update(outbox).where(outbox.c.state == "pending").values(next_attempt_at=datetime.now(UTC)))


def _in_backoff(core: object) -> None:
    """The pending messages wait an hour (however slow this test runs)."""
    from pacs.outbox import outbox

    with core.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(update(outbox).where(outbox.c.state == "pending")
                     .values(next_attempt_at=datetime.now(UTC) + timedelta(hours=1)))


def test_ar_is_retried_for_as_long_as_it_takes(sender: tuple[object, ScriptedHIS]) -> None:
    """AR is the HIS's own failure ("send it again"): twenty AR answers (far
    more than the old limit of ten) leave the message pending, its backoff
    capped at a minute; when the HIS recovers it is delivered."""
    from pacs.outbox import outbox

    out, his = sender
    core = out.pacs  # type: ignore[attr-defined]
    cap = core.settings.his_retry_max_seconds
    his.answer = lambda m: "AR"
    _enqueue(core, "order_status", _order_status(1, "ACC9001", "COMPLETED"))
    for _ in range(20):
        assert out.deliver_due() == 0  # type: ignore[attr-defined]
        _time_passes(core)
    with core.engine.connect() as conn:
        row = conn.execute(select(outbox)).one()
    assert row.state == "pending" and row.attempts == 20 and "AR" in row.last_error
    out.deliver_due()  # type: ignore[attr-defined]
    with core.engine.connect() as conn:
        row = conn.execute(select(outbox)).one()
    wait = row.next_attempt_at.replace(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(seconds=cap - 5) < wait <= timedelta(seconds=cap + 1)
    his.answer = lambda m: "AA"
    _time_passes(core)
    assert out.deliver_due() == 1  # type: ignore[attr-defined]
    assert len(his.received) == 22 and his.received[-1].answer == "AA"


def test_order_statuses_keep_their_order_per_order(sender: tuple[object, ScriptedHIS]) -> None:
    """IP refused (AR) then CM queued: CM waits for IP, whatever its backoff;
    the other order's status goes out meanwhile; once IP is accepted, CM
    follows in the same round."""
    out, his = sender
    core = out.pacs  # type: ignore[attr-defined]
    refuse = {"IP": True}
    his.answer = lambda m: "AR" if refuse["IP"] and "|PACC9001|" in m and "||IP" in m else "AA"
    _enqueue(core, "order_status", _order_status(1, "ACC9001", "IN PROGRESS"))
    assert out.deliver_due() == 0  # type: ignore[attr-defined]
    _in_backoff(core)
    _enqueue(core, "order_status", _order_status(1, "ACC9001", "COMPLETED"))
    _enqueue(core, "order_status", _order_status(2, "ACC9002", "IN PROGRESS"))
    assert out.deliver_due() == 1  # type: ignore[attr-defined]  # ACC9002 only: IP of ACC9001 is in backoff
    _time_passes(core)
    assert out.deliver_due() == 0  # type: ignore[attr-defined]  # IP refused again; CM still waits
    refuse["IP"] = False
    _time_passes(core)
    assert out.deliver_due() == 2  # type: ignore[attr-defined]
    sent = [(r.field("OBR", 18), r.field("ORC", 5), r.answer) for r in his.received]
    assert sent == [("ACC9001", "IP", "AR"), ("ACC9002", "IP", "AA"), ("ACC9001", "IP", "AR"),
                    ("ACC9001", "IP", "AA"), ("ACC9001", "CM", "AA")]


def test_dead_messages_wait_for_an_operator_or_a_newer_message(sender: tuple[object, ScriptedHIS]) -> None:
    """AE three times: dead, holding back nothing. A newer status of the same
    order that reaches the HIS supersedes it (never resent: it would arrive
    out of order); one without a newer message is sent again on retry."""
    from pacs import outbox

    out, his = sender
    core = out.pacs  # type: ignore[attr-defined]
    his.answer = lambda m: "AE" if "||IP" in m else "AA"
    _enqueue(core, "order_status", _order_status(1, "ACC9001", "IN PROGRESS"))
    _enqueue(core, "order_status", _order_status(2, "ACC9002", "IN PROGRESS"))
    for _ in range(3):
        out.deliver_due()  # type: ignore[attr-defined]
        _time_passes(core)
    assert outbox.depth(core.engine) == {"dead": 2}
    dead = {m["key"]: m for m in outbox.list_messages(core.engine, "dead")}
    assert set(dead) == {"order:1", "order:2"} and dead["order:1"]["attempts"] == 3
    assert "rejection 3 of 3" in dead["order:1"]["last_error"]
    # Not blocked by the dead IP: CM of order 1 goes out and supersedes it.
    _enqueue(core, "order_status", _order_status(1, "ACC9001", "COMPLETED"))
    assert out.deliver_due() == 1  # type: ignore[attr-defined]
    assert outbox.depth(core.engine) == {"dead": 1, "sent": 1, "superseded": 1}
    # The operator retries what is still dead (order 2), counted afresh.
    his.answer = lambda m: "AA"
    assert outbox.retry(core.engine) == [dead["order:2"]["id"]]
    assert outbox.retry(core.engine, pk=dead["order:1"]["id"]) == []  # superseded: not resent
    assert out.deliver_due() == 1  # type: ignore[attr-defined]
    assert outbox.depth(core.engine) == {"sent": 2, "superseded": 1}
    sent = [(r.field("OBR", 18), r.field("ORC", 5), r.answer) for r in his.received]
    assert sent[-2:] == [("ACC9001", "CM", "AA"), ("ACC9002", "IP", "AA")]


def test_a_message_the_his_never_acknowledges_holds_back_only_its_own_order(
    sender: tuple[object, ScriptedHIS]
) -> None:
    """The HIS takes one message and hangs up without an ACK, every time: the
    other orders' messages still go out in the same round (they waited as long
    as that one message was retried), and it is retried itself."""
    from pacs.outbox import outbox

    out, his = sender
    core = out.pacs  # type: ignore[attr-defined]
    his.answer = lambda m: "CLOSE" if "|PACC9101|" in m else "AA"
    for n, accession in enumerate(("ACC9101", "ACC9102", "ACC9103"), start=1):
        _enqueue(core, "order_status", _order_status(n, accession, "IN PROGRESS"))
    assert out.deliver_due() == 2  # type: ignore[attr-defined]
    assert [r.field("OBR", 18) for r in his.received if r.answer == "AA"] == ["ACC9102", "ACC9103"]
    with core.engine.connect() as conn:
        stuck = conn.execute(select(outbox).where(outbox.c.state != "sent")).one()
    assert stuck.state == "pending" and "no ACK" in stuck.last_error
