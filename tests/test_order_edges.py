"""Edges of HIS orders with several steps (IHE RAD-4 / RAD-7) that were wrong:

1. a CA / DC naming a step a single-step order does not have withdrew that
   order's step (it is refused AE 204, 404 over JSON, as for several steps);
2. a CA / XO naming its order by the placer order number only took no
   per-accession lock: on PostgreSQL it raced an MPPS N-SET and overwrote a
   COMPLETED step with CANCELLED (the HIS had been told CM);
3. a step the HIS discontinued (DC) while its MPPS was in progress came back:
   an N-SET IN PROGRESS put it on the worklist again, the N-SET COMPLETED
   completed it and told the HIS CM (or IP), and a new N-CREATE was let in.
   It now stays withdrawn, as a cancelled (CA) one did; the performed step is
   kept;
4. (found beside 2) an MPPS N-CREATE decided whether its step was withdrawn
   before taking the locks: on PostgreSQL one racing a CA was accepted;
5. (the same) an N-SET read its performed step before the locks: of two
   N-SETs at once, the second overwrote the first's final status.

Everything goes over real sockets to one real `pacs serve` per index backend
for the module: MLLP (python-hl7) for the HIS, DCMTK findscu -W as the
modality's worklist, pynetdicom for MPPS, HTTP for the JSON API, and a stand-in
HIS recording the status messages. The PostgreSQL races are forced, not timed:
one side runs in this process on the server's database and holds its
transaction open until the server's backend is seen waiting for a lock.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from .conftest import Backend, PacsServer, free_port
from .peers import create_database, drop_database, serving_with_his, wait_until
from .test_hl7_robustness import fields
from .test_order_steps import MSH, PID, WITH, completed, items, omi, order, pps, step, step_statuses
from .test_worklist_conformance import his_statuses
from .test_worklist_ris import _mpps_status, msa, orm, send, worklist

SPS = "ScheduledProcedureStepSequence[0]"


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server per index backend, with a stand-in HIS (``server.his``);
    each test its own accessions."""
    pg = create_database() if request.param == "pg" else None
    his_port = free_port()
    pacs = PacsServer(tmp_path_factory.mktemp("edges") / "data", Backend(request.param, pg, None, {}),
                      extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}"})
    with serving_with_his(pacs, his_port, ("bs.mai", "Lê^Thị Mai")) as serving:
        yield serving
    if pg:
        drop_database(pg)


# The races below exist on PostgreSQL only (SQLite writers queue: BEGIN IMMEDIATE).
POSTGRESQL_ONLY = pytest.mark.parametrize("server", ["pg"], indirect=True)


# -- helpers ------------------------------------------------------------------------------------
def queued_statuses(server: PacsServer, accession: str) -> list[str]:
    """The statuses of every order status message queued for the HIS about
    *accession*, delivered or not (queued in the transaction of the change:
    final once the change was answered)."""
    from pacs.index.models import OutboundMessage

    outbox = OutboundMessage.__table__
    core = server.core()
    try:
        with core.engine.connect() as conn:
            payloads = conn.execute(select(outbox.c.payload).where(outbox.c.kind == "order_status")
                                    .order_by(outbox.c.pk)).scalars().all()
    finally:
        core.close()
    data = [json.loads(p) for p in payloads]
    return [d["status"] for d in data if d["order"]["accession_number"] == accession]


def performed_statuses(server: PacsServer, *uids: str) -> list[str]:
    """The stored status of each performed step (MPPS) *uids*."""
    from pacs.index.models import PerformedStep

    steps = PerformedStep.__table__
    core = server.core()
    try:
        with core.engine.connect() as conn:
            found = dict(conn.execute(select(steps.c.sop_uid, steps.c.status).where(steps.c.sop_uid.in_(uids))).all())
    finally:
        core.close()
    return [found.get(uid, "-") for uid in uids]


def started(server: PacsServer, uid: str, attributes: Dataset) -> None:
    assert int(_mpps_status(server, uid, attributes, create=True).Status) == 0


def n_set(server: PacsServer, uid: str, attributes: Dataset) -> int:
    return int(_mpps_status(server, uid, attributes, create=False).Status)


def still_in_progress() -> Dataset:
    """An N-SET that changes attributes but not the status (no status: IN PROGRESS)."""
    ds = Dataset()
    ds.PerformedProcedureStepDescription = "CT nguc"
    return ds


def withdrawal_by_placer(control: str, placer: str, order_control: str = "CA") -> str:
    """A CA / DC / XO naming its order by the placer order number (ORC-2,
    OBR-2) only: no accession (IPC-1, OBR-18), no filler number (ORC-3, OBR-3)."""
    return "\n".join([MSH.format(kind="ORM^O01", control=control), PID.format(pid="BN910001"),
                      f"ORC|{order_control}|{placer}||||", f"OBR|1|{placer}||CT-NGUC^CT ngực^L"])


def pg_dsn(server: PacsServer) -> str:
    assert server.backend.index_url
    return server.backend.index_url.replace("postgresql+psycopg://", "postgresql://")


def a_backend_waits_for_a_lock(server: PacsServer) -> bool:
    """Whether a session of the server's database is waiting for a lock
    (advisory or row): the other side of a forced race got there."""
    with psycopg.connect(pg_dsn(server), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'").fetchone()
    return bool(row and row[0])


class Paused:
    """Wraps a method of *owner* (default: OrderService; a module for one of
    its functions) so that its transaction, once the method ran (*before*:
    before it runs), waits (locks held, nothing committed) until
    :meth:`release`. Calls after the release (a transaction run again) go
    through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, owner: Any = None, *,
                 before: bool = False) -> None:
        from pacs.orders import OrderService

        owner = OrderService if owner is None else owner
        self.reached, self._go = threading.Event(), threading.Event()
        original = getattr(owner, name)

        def paused(*args: Any, **kwargs: Any) -> Any:
            if before:
                self._wait()
            result = original(*args, **kwargs)
            if not before:
                self._wait()
            return result

        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        monkeypatch.setattr(owner, name, staticmethod(paused) if static else paused)

    def _wait(self) -> None:
        self.reached.set()
        assert self._go.wait(120), "never released"

    def release(self) -> None:
        self._go.set()


class Background(threading.Thread):
    """Runs *job* in a thread; its result (or exception) after :meth:`outcome`."""

    def __init__(self, job: Any) -> None:
        super().__init__(daemon=True)
        self.job, self.result, self.error = job, None, None  # type: ignore[var-annotated]
        self.start()

    def run(self) -> None:
        try:
            self.result = self.job()
        except BaseException as exc:  # reported by outcome()
            self.error = exc

    def outcome(self) -> Any:
        self.join(120)
        assert not self.is_alive(), "the job did not finish"
        if self.error is not None:
            raise self.error
        return self.result


# -- 1. a withdrawal naming a step the order does not have ------------------------------------------------
def test_a_withdrawal_of_an_unknown_step_of_a_single_step_order_is_refused(server: PacsServer,
                                                                            tmp_path: Path) -> None:
    """A CA / DC whose SPS ID (IPC-4, OBR-20) names no step of a single-step
    order withdrew that step anyway; it is refused AE 204, as for an order
    of several steps, and the step stays on the worklist. Over JSON: 404."""
    study_uid = generate_uid()
    assert msa(send(server, omi("U1", "EUN001", step("EUN001-1"), study_uid=study_uid)))[0] == "AA"
    for control, kind in (("U2", "CA"), ("U3", "DC")):
        ack = send(server, omi(control, "EUN001", step("EUN001-9"), order_control=kind, study_uid=study_uid))
        assert msa(ack) == ("AE", control) and fields(ack, "ERR")[3].startswith("204^"), (kind, ack)
        assert "no scheduled step EUN001-9" in fields(ack, "ERR")[8]
    # ORM: the SPS ID in OBR-20.
    assert msa(send(server, orm("U4", "EUN002", pid="BN910002")))[0] == "AA"
    ack = send(server, orm("U5", "EUN002", pid="BN910002", order_control="CA").replace("|SPSEUN002|", "|SPSOTHER|"))
    assert msa(ack)[0] == "AE" and fields(ack, "ERR")[3].startswith("204^")
    assert step_statuses(server, "EUN001") == {"EUN001-1": "SCHEDULED"}
    assert step_statuses(server, "EUN002") == {"SPSEUN002": "SCHEDULED"}
    assert [i[0] for i in items(server, tmp_path, "EUN001")] == ["EUN001-1"]
    # The JSON API: 404 (no such step), as for an order of several steps.
    with server.http() as http:
        unknown = http.delete("/api/orders/EUN001", params={"step_id": "EUN001-9"})
        assert unknown.status_code == 404 and "no scheduled step" in unknown.text
        assert http.get("/api/orders/EUN001").json()["status"] == "SCHEDULED"
        named = http.delete("/api/orders/EUN001", params={"step_id": "EUN001-1"})
        assert named.status_code == 200 and named.json()["status"] == "CANCELLED"
    # Its own step ID, or none, still withdraws it.
    assert msa(send(server, orm("U6", "EUN002", pid="BN910002", order_control="DC")))[0] == "AA"
    assert step_statuses(server, "EUN002") == {"SPSEUN002": "DISCONTINUED"}
    assert items(server, tmp_path, "EUN001") == [] and items(server, tmp_path, "EUN002") == []


# -- 3. a step withdrawn while its MPPS was in progress ---------------------------------------------------
def test_a_step_discontinued_during_its_mpps_stays_withdrawn(server: PacsServer, tmp_path: Path) -> None:
    """The HIS discontinues (DC) an order whose MPPS is in progress. The exam
    happened: the performed step is kept and completes. But the step stays
    DISCONTINUED -- an N-SET IN PROGRESS does not put it back on the
    worklist, the N-SET COMPLETED does not complete it nor tell the HIS CM
    -- as a cancelled (CA) one did already."""
    study_uid = generate_uid()
    assert msa(send(server, omi("D1", "EDC001", step("EDC001-1"), study_uid=study_uid)))[0] == "AA"
    uid = generate_uid()
    started(server, uid, pps("EDC001", study_uid, "EDC001-1"))
    assert msa(send(server, omi("D2", "EDC001", order_control="DC", study_uid=study_uid))) == ("AA", "D2")
    assert step_statuses(server, "EDC001") == {"EDC001-1": "DISCONTINUED"}
    assert n_set(server, uid, still_in_progress()) == 0
    assert step_statuses(server, "EDC001") == {"EDC001-1": "DISCONTINUED"}
    assert worklist(server, tmp_path, "AccessionNumber=EDC001", f"{SPS}.ScheduledProcedureStepStatus=*",
                    f"{SPS}.ScheduledProcedureStepID") == []
    assert worklist(server, tmp_path, "AccessionNumber=EDC001", f"{SPS}.ScheduledProcedureStepStatus=STARTED",
                    f"{SPS}.ScheduledProcedureStepID") == []
    assert n_set(server, uid, completed()) == 0  # accepted: the performed step is kept
    assert performed_statuses(server, uid) == ["COMPLETED"]
    assert order(server, "EDC001")["status"] == "DISCONTINUED"
    # What the HIS hears: IP when it started; its own DC is not echoed, and no CM.
    assert queued_statuses(server, "EDC001") == ["IN PROGRESS"]
    assert wait_until(lambda: his_statuses(server.his, "EDC001") == ["IP"], timeout=60)  # type: ignore[attr-defined]
    # A cancelled one, for comparison, already behaved so.
    assert msa(send(server, omi("D3", "EDC002", step("EDC002-1"), study_uid=(other := generate_uid()))))[0] == "AA"
    cancelled = generate_uid()
    started(server, cancelled, pps("EDC002", other, "EDC002-1"))
    assert msa(send(server, omi("D4", "EDC002", order_control="CA", study_uid=other)))[0] == "AA"
    assert n_set(server, cancelled, completed()) == 0
    assert step_statuses(server, "EDC002") == {"EDC002-1": "CANCELLED"}
    assert queued_statuses(server, "EDC002") == ["IN PROGRESS"]


def test_a_discontinued_step_of_two_stays_withdrawn_and_refuses_a_new_mpps(server: PacsServer,
                                                                           tmp_path: Path) -> None:
    """Two steps; the first's MPPS in progress, the HIS discontinues that
    step (the order goes back to SC: the other waits). The MPPS completing
    leaves it withdrawn: the order stays SCHEDULED (no IP for the HIS, the
    withdrawn step not on the worklist); a new N-CREATE naming it is
    refused 0110H like one naming a cancelled step. The other step, done,
    completes the order: CM (one performed, the other withdrawn)."""
    study_uid = generate_uid()
    assert msa(send(server, omi("E1", "EDC003", step("EDC003-1"), step("EDC003-2", protocol=WITH),
                                study_uid=study_uid)))[0] == "AA"
    first = generate_uid()
    started(server, first, pps("EDC003", study_uid, "EDC003-1"))
    assert msa(send(server, omi("E2", "EDC003", step("EDC003-1"), order_control="DC", study_uid=study_uid)))[0] == "AA"
    assert step_statuses(server, "EDC003") == {"EDC003-1": "DISCONTINUED", "EDC003-2": "SCHEDULED"}
    assert n_set(server, first, still_in_progress()) == 0
    assert n_set(server, first, completed()) == 0
    assert step_statuses(server, "EDC003") == {"EDC003-1": "DISCONTINUED", "EDC003-2": "SCHEDULED"}
    assert order(server, "EDC003")["status"] == "SCHEDULED"
    assert [(i[0], i[4]) for i in items(server, tmp_path, "EDC003")] == [("EDC003-2", "SCHEDULED")]
    refused = _mpps_status(server, generate_uid(), pps("EDC003", study_uid, "EDC003-1"), create=True)
    assert int(refused.Status) == 0x0110 and "discontinued by the HIS" in refused.ErrorComment
    assert step_statuses(server, "EDC003") == {"EDC003-1": "DISCONTINUED", "EDC003-2": "SCHEDULED"}
    second = generate_uid()
    started(server, second, pps("EDC003", study_uid, "EDC003-2"))
    assert n_set(server, second, completed()) == 0
    assert order(server, "EDC003")["status"] == "COMPLETED"
    assert performed_statuses(server, first, second) == ["COMPLETED", "COMPLETED"]
    assert queued_statuses(server, "EDC003") == ["IN PROGRESS", "SCHEDULED", "IN PROGRESS", "COMPLETED"]
    assert wait_until(lambda: len(his_statuses(server.his, "EDC003")) >= 4, timeout=60)  # type: ignore[attr-defined]
    assert his_statuses(server.his, "EDC003") == ["IP", "SC", "IP", "CM"]  # type: ignore[attr-defined]


# -- 2. a withdrawal by placer order number, racing an MPPS (PostgreSQL) ---------------------------------
@POSTGRESQL_ONLY
def test_a_cancel_by_placer_number_waits_for_a_running_mpps(server: PacsServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An N-SET COMPLETED is being applied (its transaction open, the step
    moved) when a CA naming the order by its placer number only arrives. It
    took no lock: it read the step IN PROGRESS, waited for the row, and then
    overwrote COMPLETED with CANCELLED, after the HIS had been queued CM.
    Now it waits for the order's lock, reads the step COMPLETED and is
    refused AE 207, as a CA naming the accession is."""
    from pacs.index import create_index_engine
    from pacs.orders import OrderService

    study_uid = generate_uid()
    assert msa(send(server, omi("P1", "EPL001", step("EPL001-1"), pid="BN910001", study_uid=study_uid)))[0] == "AA"
    uid = generate_uid()
    started(server, uid, pps("EPL001", study_uid, "EPL001-1"))
    engine = create_index_engine(server.backend.index_url)
    try:
        pause = Paused(monkeypatch, "_move_step")
        mpps = Background(lambda: OrderService(engine).record_step(uid, status="COMPLETED", end="20261206093000",
                                                                   create=False))
        assert pause.reached.wait(60)
        cancel = Background(lambda: send(server, withdrawal_by_placer("P2", "PEPL001")))
        assert wait_until(lambda: a_backend_waits_for_a_lock(server) or not cancel.is_alive(), timeout=60,
                          interval=0.05)
        pause.release()
        assert mpps.outcome()["status"] == "COMPLETED"
        ack = cancel.outcome()
    finally:
        engine.dispose()
    assert msa(ack)[0] == "AE" and fields(ack, "ERR")[3].startswith("207^"), ack
    assert step_statuses(server, "EPL001") == {"EPL001-1": "COMPLETED"}
    assert queued_statuses(server, "EPL001") == ["IN PROGRESS", "COMPLETED"]
    # Not racing, a CA and an XO by placer number apply (the lock is no obstacle).
    assert msa(send(server, omi("P3", "EPL002", step("EPL002-1"), pid="BN910001")))[0] == "AA"
    assert msa(send(server, withdrawal_by_placer("P4", "PEPL002", "XO")))[0] == "AA"
    assert msa(send(server, withdrawal_by_placer("P5", "PEPL002", "CA")))[0] == "AA"
    assert step_statuses(server, "EPL002") == {"EPL002-1": "CANCELLED"}


# -- 4. an N-CREATE racing a cancel (PostgreSQL) -------------------------------------------------------------
@POSTGRESQL_ONLY
def test_an_mpps_created_while_a_cancel_commits_is_refused(server: PacsServer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A CA is being applied (its transaction open, the step cancelled) when
    the modality's N-CREATE for the step arrives. The N-CREATE checked for a
    withdrawn step before waiting for the order's lock, saw SCHEDULED and was
    accepted (the step stayed cancelled, the modality was not told). It now
    checks again under the lock: 0110H, as for a step cancelled earlier."""
    from pacs.index import create_index_engine
    from pacs.orders import OrderInfo, OrderService, PatientInfo

    study_uid = generate_uid()
    assert msa(send(server, omi("N1", "ENC001", step("ENC001-1"), pid="BN910003", study_uid=study_uid)))[0] == "AA"
    engine = create_index_engine(server.backend.index_url)
    try:
        pause = Paused(monkeypatch, "_cancel")
        info = OrderInfo(patient=PatientInfo("BN910003"), accession_number="ENC001")
        cancel = Background(lambda: OrderService(engine).cancel(info))
        assert pause.reached.wait(60)
        create = Background(lambda: _mpps_status(server, generate_uid(), pps("ENC001", study_uid, "ENC001-1"),
                                                 create=True))
        assert wait_until(lambda: a_backend_waits_for_a_lock(server) or not create.is_alive(), timeout=60,
                          interval=0.05)
        pause.release()
        assert cancel.outcome()["status"] == "CANCELLED"
        refused = create.outcome()
    finally:
        engine.dispose()
    assert int(refused.Status) == 0x0110 and "cancelled by the HIS" in refused.ErrorComment
    assert step_statuses(server, "ENC001") == {"ENC001-1": "CANCELLED"}


# -- 5. two N-SETs of one performed step at once (PostgreSQL) ------------------------------------------------
@POSTGRESQL_ONLY
def test_a_second_n_set_racing_the_final_one_is_refused(server: PacsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An N-SET COMPLETED is being applied when an N-SET DISCONTINUED of the
    same performed step arrives (a modality resending after a timeout, or
    changing its mind). The second read the performed step IN PROGRESS
    before waiting for the order's lock and then overwrote COMPLETED with
    DISCONTINUED (answered Success). It now reads it again under the lock:
    0110H, as an N-SET of a completed step is."""
    from pacs.index import create_index_engine
    from pacs.orders import OrderService

    study_uid = generate_uid()
    assert msa(send(server, omi("S1", "ENS001", step("ENS001-1"), pid="BN910004", study_uid=study_uid)))[0] == "AA"
    uid = generate_uid()
    started(server, uid, pps("ENS001", study_uid, "ENS001-1"))
    engine = create_index_engine(server.backend.index_url)
    try:
        pause = Paused(monkeypatch, "_move_step")
        first = Background(lambda: OrderService(engine).record_step(uid, status="COMPLETED", end="20261206093000",
                                                                    create=False))
        assert pause.reached.wait(60)
        stop = completed()
        stop.PerformedProcedureStepStatus = "DISCONTINUED"
        second = Background(lambda: _mpps_status(server, uid, stop, create=False))
        assert wait_until(lambda: a_backend_waits_for_a_lock(server) or not second.is_alive(), timeout=60,
                          interval=0.05)
        pause.release()
        assert first.outcome()["status"] == "COMPLETED"
        refused = second.outcome()
    finally:
        engine.dispose()
    assert int(refused.Status) == 0x0110 and "already COMPLETED" in refused.ErrorComment
    assert performed_statuses(server, uid) == ["COMPLETED"]
    assert step_statuses(server, "ENS001") == {"ENS001-1": "COMPLETED"}
