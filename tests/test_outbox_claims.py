"""The HL7 outbox shared by several nodes (one PostgreSQL database): a claim
is a lease, renewed before each send; a node whose lease ran out and passed
to another node sends nothing more of that message and changes nothing of
its row. So no message reaches the HIS twice because two nodes held it, a
stale copy of an order's status never arrives after the later one, and a
slow node's late failure never puts back a message another node delivered.

Two OutboundSenders (two Pacs cores, as two nodes) on one PostgreSQL
database deliver to a fake HIS over real MLLP that holds chosen messages
without an ACK until the test lets it answer. Time passing is the test
moving a lease into the past (an UPDATE), never a wait on the clock."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from .peers import MLLPListener, free_port

HOLD_LIMIT = 60.0  # seconds a held message waits at most (a failing test must not hang)


@dataclass
class Receipt:
    control_id: str
    accession: str
    status: str  # ORC-5 (IP, CM...) or OBR-25 of a report
    answer: str


def _field(message: str, segment: str, index: int) -> str:
    for line in message.split("\r"):
        if line.startswith(segment + "|"):
            fields = line.split("|")
            return fields[index] if index < len(fields) else ""
    return ""


class SlowHIS(MLLPListener):
    """A HIS over real MLLP, one thread per connection (several nodes send at
    once). The first copy of a message about an accession in :attr:`holds`
    waits, unanswered, until the test sets that hold's ``release`` event (the
    HIS is slow); its ``arrived`` event tells the test it is being held.
    ``answer(message, held)`` gives MSA-1 (or raw ACK bytes)."""

    idle_timeout = None

    def __init__(self) -> None:
        self.received: list[Receipt] = []
        self.holds: dict[str, tuple[threading.Event, threading.Event]] = {}
        self.answer: Callable[[str, bool], str | bytes] = lambda message, held: "AA"
        self._lock = threading.Lock()
        super().__init__(free_port())

    def hold(self, accession: str) -> tuple[threading.Event, threading.Event]:
        """(arrived, release) for the first copy of *accession*'s next message."""
        self.holds[accession] = (threading.Event(), threading.Event())
        return self.holds[accession]

    def respond(self, message: bytes) -> bytes:
        return b"\x0b" + self._reply(message.decode()) + b"\x1c\r"

    def _reply(self, message: str) -> bytes:
        accession = _field(message, "OBR", 18)
        with self._lock:
            hold = self.holds.pop(accession, None)
        if hold is not None:
            arrived, release = hold
            arrived.set()
            release.wait(HOLD_LIMIT)
        code = self.answer(message, hold is not None)
        control = _field(message, "MSH", 9)
        status = _field(message, "ORC", 5) if "ORM^O01" in message else _field(message, "OBR", 25)
        with self._lock:
            self.received.append(Receipt(control, accession, status, code if isinstance(code, str) else "raw"))
        if isinstance(code, bytes):
            return code
        return f"MSH|^~\\&|HIS||PACS||20260101||ACK|A{control}|P|2.5\rMSA|{code}|{control}\r".encode()

    def delivered(self) -> list[Receipt]:
        """What the HIS took (answered AA), in the order it answered."""
        with self._lock:
            return [r for r in self.received if r.answer == "AA"]

    def stop(self) -> None:
        for _, release in list(self.holds.values()):
            release.set()
        super().stop()


def _order_status(pk: int, accession: str, status: str) -> dict:
    return {"order": {"pk": pk, "accession_number": accession, "patient_id": "BN1", "issuer": "BVDK",
                      "name": "Nguyễn^Văn An", "placer_order_number": f"P{accession}",
                      "filler_order_number": f"F{accession}", "procedure_code": "CT01",
                      "requested_procedure_description": "CT ngực", "procedure_code_scheme": "L"},
            "status": status}


@dataclass
class Nodes:
    a: object  # OutboundSender of node A
    b: object  # OutboundSender of node B
    his: SlowHIS

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self.a.pacs.engine  # type: ignore[attr-defined]

    def enqueue(self, *statuses: tuple[int, str, str]) -> list[int]:
        from pacs import outbox

        with self.engine.begin() as conn:
            return [outbox.enqueue(conn, "his", "order_status", _order_status(pk, accession, status))
                    for pk, accession, status in statuses]

    def rows(self) -> dict[int, object]:
        from pacs.outbox import outbox

        with self.engine.connect() as conn:
            return {r.pk: r for r in conn.execute(select(outbox).order_by(outbox.c.pk))}

    def lease_runs_out(self, *pks: int) -> None:
        """The leases on *pks* are over (as if the holder had taken that long)."""
        from pacs.outbox import outbox

        with self.engine.begin() as conn:
            conn.execute(update(outbox).where(outbox.c.pk.in_(pks), outbox.c.state == "sending")
                         .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1)))

    def backoffs_over(self) -> None:
        from pacs.outbox import outbox

        with self.engine.begin() as conn:
            conn.execute(update(outbox).where(outbox.c.state == "pending")
                         .values(next_attempt_at=datetime.now(UTC)))


@pytest.fixture
def nodes(tmp_path: Path, pg_url: str) -> Iterator[Nodes]:
    from ris_bridge.outbound import OutboundSender

    from .fuzzing import core_on

    his = SlowHIS()
    try:
        with core_on(tmp_path / "a", pg_url) as core_a, core_on(tmp_path / "b", pg_url) as core_b:
            yield Nodes(OutboundSender(core_a, "127.0.0.1", his.port),
                        OutboundSender(core_b, "127.0.0.1", his.port), his)
    finally:
        his.stop()


class Delivering:
    """Node A delivering in a thread of its own (it blocks on the slow HIS)."""

    def __init__(self, sender: object) -> None:
        self.result: list[int] = []
        self.error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(sender,), daemon=True)
        self._thread.start()

    def _run(self, sender: object) -> None:
        try:
            self.result.append(sender.deliver_due())  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error.append(exc)

    def join(self) -> int:
        self._thread.join(HOLD_LIMIT + 30)
        assert not self._thread.is_alive(), "node A never finished its round"
        if self.error:
            raise self.error[0]
        return self.result[0]


def _arrives(event: threading.Event) -> None:
    assert event.wait(HOLD_LIMIT), "the held message never reached the HIS"


def test_a_node_whose_lease_ran_out_sends_no_stale_status_after_the_next(nodes: Nodes) -> None:
    """Node A claims order 2's IP and order 1's IP, and is held by the slow
    HIS on order 2's. Its lease on order 1's IP runs out meanwhile: node B
    takes it, delivers it, then order 1's CM. When the HIS finally answers A,
    A must not send order 1's IP (B delivered it; it would also land after
    CM, putting the order back in progress at the HIS): every message reaches
    the HIS once, and order 1's statuses in the order they were queued."""
    x, ip, cm = nodes.enqueue((2, "ACC8002", "IN PROGRESS"), (1, "ACC8001", "IN PROGRESS"),
                              (1, "ACC8001", "COMPLETED"))
    arrived, release = nodes.his.hold("ACC8002")
    a = Delivering(nodes.a)
    _arrives(arrived)
    assert nodes.rows()[ip].state == "sending"  # claimed by A with order 2's message
    nodes.lease_runs_out(ip)
    assert nodes.b.deliver_due() == 2  # type: ignore[attr-defined]  # order 1's IP, then its CM
    release.set()
    a.join()

    delivered = nodes.his.delivered()
    assert sorted(r.control_id for r in delivered) == sorted({r.control_id for r in delivered})
    assert [(r.accession, r.status) for r in delivered if r.accession == "ACC8001"] == [
        ("ACC8001", "IP"), ("ACC8001", "CM")]
    assert len(nodes.his.received) == 3
    assert {pk: row.state for pk, row in nodes.rows().items()} == {x: "sent", ip: "sent", cm: "sent"}


def test_a_late_failure_does_not_put_back_what_another_node_delivered(nodes: Nodes) -> None:
    """A's copy is held so long that its lease runs out; B sends the message
    and the HIS takes it. Then the HIS answers A's copy AR: A's failure must
    not make the delivered message pending again (it would be sent a third
    time)."""
    (x,) = nodes.enqueue((3, "ACC8003", "COMPLETED"))
    arrived, release = nodes.his.hold("ACC8003")
    nodes.his.answer = lambda message, held: "AR" if held else "AA"
    a = Delivering(nodes.a)
    _arrives(arrived)
    nodes.lease_runs_out(x)
    assert nodes.b.deliver_due() == 1  # type: ignore[attr-defined]
    release.set()
    assert a.join() == 0
    row = nodes.rows()[x]
    assert (row.state, row.attempts) == ("sent", 0)
    nodes.backoffs_over()
    assert nodes.a.deliver_due() == 0 and nodes.b.deliver_due() == 0  # type: ignore[attr-defined]
    assert [r.answer for r in nodes.his.received] == ["AA", "AR"]


def test_a_batch_is_no_larger_than_its_lease_covers_and_is_renewed_before_each_send(nodes: Nodes) -> None:
    """With the default 30 s ACK timeout a 2-minute lease covers three sends:
    A claims three of five due messages (not twenty), and renews the claims
    it still holds before each send."""
    pks = nodes.enqueue(*[(n, f"ACC81{n:02d}", "IN PROGRESS") for n in range(1, 6)])
    first, release_first = nodes.his.hold("ACC8101")
    second, release_second = nodes.his.hold("ACC8102")
    a = Delivering(nodes.a)
    _arrives(first)
    rows = nodes.rows()
    assert [rows[pk].state for pk in pks] == ["sending"] * 3 + ["pending"] * 2
    claimed_until = rows[pks[2]].next_attempt_at
    release_first.set()
    _arrives(second)
    assert nodes.rows()[pks[2]].next_attempt_at > claimed_until  # renewed before the second send
    release_second.set()
    a.join()
    nodes.a.deliver_due()  # type: ignore[attr-defined]
    assert sorted(r.accession for r in nodes.his.delivered()) == [f"ACC81{n:02d}" for n in range(1, 6)]


def test_an_unreadable_ack_fails_only_its_own_message(nodes: Nodes) -> None:
    """An ACK that is not valid in the character set it declares used to
    raise out of the round, leaving the whole batch in "sending" for its
    lease. Now an ACK with no readable MSA fails its message alone (retried,
    like AR), and one whose MSA-1 is a plain AA despite bad bytes in its text
    is taken as AA (sending it again would not change the HIS's answer)."""
    garbage = "MSH|^~\\&|HIS||PACS||20260101||ACK|G1|P|2.5||||||UNICODE UTF-8\rNTE|1||\xe9".encode("latin-1")

    def answer(message: str, held: bool) -> str | bytes:
        accession = _field(message, "OBR", 18)
        if accession == "ACC8202":
            return garbage
        if accession == "ACC8203":
            control = _field(message, "MSH", 9)
            # "Đã nhận" written in Latin-1-ish bytes: not UTF-8, as declared.
            return (f"MSH|^~\\&|HIS||PACS||20260101||ACK|G2|P|2.5||||||UNICODE UTF-8\r"
                    f"MSA|AA|{control}|").encode() + b"\xd0\xe3 nh\xe2n\r"
        return "AA"

    nodes.his.answer = answer
    first, second, third = nodes.enqueue((1, "ACC8201", "IN PROGRESS"), (2, "ACC8202", "IN PROGRESS"),
                                         (3, "ACC8203", "IN PROGRESS"))
    assert nodes.a.deliver_due() == 2  # type: ignore[attr-defined]
    rows = nodes.rows()
    assert (rows[first].state, rows[third].state) == ("sent", "sent")
    assert rows[second].state == "pending" and "ACK unreadable" in rows[second].last_error
    assert rows[second].attempts == 1


def test_settling_a_message_needs_its_claim(nodes: Nodes) -> None:
    """The calls every sender uses (the HIS sender, the storage commitment
    reporter and a request's own thread): once a claim ran out and another
    claimed the message, the old holder's renew, release and failure change
    nothing; its delivery is still recorded while the message is undelivered."""
    from pacs import outbox

    with nodes.engine.begin() as conn:
        owned = outbox.enqueue_owned(conn, "commitment", "storage_commitment",
                                     {"key": "commitment:1.2.3", "calling": "CT1"}, timedelta(minutes=5))
    assert outbox.claim_due(nodes.engine, "commitment") == []  # the request's thread has it
    nodes.lease_runs_out(owned.pk)
    (taken,) = outbox.claim_due(nodes.engine, "commitment", limit=5)
    assert taken.pk == owned.pk and taken.lease != owned.lease
    assert outbox.renew(nodes.engine, [owned]) == []
    assert outbox.release(nodes.engine, [owned], 0) == 0
    assert outbox.mark_failed(nodes.engine, owned, "late", dead=True, retry_in=0) is False
    row = nodes.rows()[owned.pk]
    assert (row.state, row.attempts, row.next_attempt_at) == ("sending", 0, taken.lease)
    (renewed,) = outbox.renew(nodes.engine, [taken])
    assert renewed.lease > taken.lease
    assert outbox.mark_failed(nodes.engine, taken, "stale token", dead=False, retry_in=0) is False
    assert outbox.mark_sent(nodes.engine, owned) == 0  # delivered by the old holder: recorded
    assert nodes.rows()[owned.pk].state == "sent"
    assert outbox.mark_sent(nodes.engine, renewed) is None  # settled already: nothing to do
