"""Nodes sharing one PostgreSQL index whose clocks disagree (old servers
without NTP drift by minutes): claims, leases, due times and the readers'
grace of replaced objects follow the database's clock, never a node's own.

Node A is this process (its clock is the database's: same machine). Node B
is a separate process whose clock libfaketime sets 10 minutes ahead; it
runs the same pacs functions its background workers run (the forwarder's
claim, the outbox sender's claim, the sweeper's tombstone round) against
the same PostgreSQL database and SeaweedFS bucket. Time passing is the test
moving a lease or a tombstone into the past (an UPDATE), never a wait."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from .peers import ROOT, S3_ACCESS, S3_SECRET

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
AHEAD = "+10m"
DESTINATION = "dicom:READING"

# Node B's preamble: its engine and how far its clock is from the database's
# (asked with plain SQL, so it means the same with and without the fix).
_PREAMBLE = """
import json, sys
from datetime import UTC, datetime
from sqlalchemy import text
from pacs.index.db import create_index_engine
args = json.loads(sys.argv[1])
engine = create_index_engine(args["url"], pool_size=0)
with engine.connect() as conn:
    skew = (datetime.now(UTC) - conn.execute(text("SELECT now()")).scalar_one()).total_seconds()
"""


def on_node_ahead(code: str, **args: Any) -> dict[str, Any]:
    """Run *code* (after :data:`_PREAMBLE`) as node B, its clock 10 minutes
    ahead; it sets ``result``, returned with B's measured ``skew``."""
    if not FAKETIME_LIB.exists():
        pytest.fail(f"libfaketime is not installed ({FAKETIME_LIB}): apt-get install -y libfaketime "
                    "(bash scripts/test.sh does it)")
    env = {**os.environ, "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": AHEAD,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = _PREAMBLE + code + "\nprint(json.dumps({'skew': skew, 'result': result}))\n"
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    # The test means something only if B's clock really is ahead of the database's.
    assert answer["skew"] > 300, f"node B's clock is not ahead: {answer}"
    return answer


@pytest.fixture
def node_a(tmp_path: Path, pg_url: str) -> Iterator[Any]:
    from .fuzzing import core_on

    with core_on(tmp_path / "a", pg_url) as core:
        yield core


def _job(node_a: Any) -> int:
    """A routing job for one instance, due now (as ingest writes it)."""
    from pacs import routing
    from pacs.index.db import write_transaction

    rule = routing.RoutingRules(node_a.engine).add("ct", [routing.parse_condition("Modality=CT")], "dicom", "READING")
    with write_transaction(node_a.engine) as conn:
        routing.create_jobs(conn, [routing.PlannedRoute(rule.pk, rule.destination_key, 0, rule.name)],
                            "1.2.3.4.1", "1.2.3.4", _db_now(conn))
    (job,) = routing.list_jobs(node_a.engine)
    return int(job["pk"])


def _db_now(conn: Any) -> Any:
    return conn.execute(text("SELECT now()")).scalar_one()


def test_a_job_another_node_is_sending_is_not_taken_over_by_a_node_whose_clock_is_ahead(
        node_a: Any, pg_url: str) -> None:
    from pacs import routing

    pk = _job(node_a)
    (claimed,) = routing.claim(node_a.engine, DESTINATION, "node-a")
    assert claimed.pk == pk

    # B's forwarder looks for due destinations and claims; it must leave A's job alone
    # (it was sent twice: A's 5-minute lease looked expired to B's clock).
    seen = on_node_ahead("""
from pacs import routing
result = {"due": routing.due_destinations(engine),
          "claimed": [j.pk for j in routing.claim(engine, args["destination"], "node-b")],
          "cancelled": routing.cancel(engine, pk=args["pk"])}
""", url=pg_url, destination=DESTINATION, pk=pk)["result"]
    assert seen == {"due": [], "claimed": [], "cancelled": 0}
    (row,) = routing.list_jobs(node_a.engine)
    assert (row["state"], row["claimed_by"]) == ("sending", "node-a")

    # Once A's lease is really over (by the database's clock), B takes the job over.
    with node_a.engine.begin() as conn:
        conn.execute(update(routing.jobs_t).where(routing.jobs_t.c.pk == pk)
                     .values(next_attempt_at=_db_now(conn) - routing.LEASE))
    taken = on_node_ahead("""
from pacs import routing
result = [j.pk for j in routing.claim(engine, args["destination"], "node-b")]
""", url=pg_url, destination=DESTINATION)["result"]
    assert taken == [pk]


def test_a_job_written_by_a_node_whose_clock_is_ahead_is_due_at_once(node_a: Any, pg_url: str) -> None:
    from pacs import routing

    rule = routing.RoutingRules(node_a.engine).add("ct", [routing.parse_condition("Modality=CT")], "dicom", "READING")
    # B receives an instance: its ingest writes the job with B's own received time.
    on_node_ahead("""
from datetime import UTC, datetime
from pacs import routing
from pacs.index.db import write_transaction
with write_transaction(engine) as conn:
    routing.create_jobs(conn, [routing.PlannedRoute(args["rule"], args["destination"], 0, "ct")],
                        "1.2.3.4.1", "1.2.3.4", datetime.now(UTC))
result = None
""", url=pg_url, rule=rule.pk, destination=DESTINATION)
    # A's forwarder sends it now, not once A's clock reaches B's.
    assert routing.due_destinations(node_a.engine) == [DESTINATION]
    assert [j.sop_uid for j in routing.claim(node_a.engine, DESTINATION, "node-a")] == ["1.2.3.4.1"]


def test_an_outbox_message_another_node_is_sending_is_not_claimed_by_a_node_whose_clock_is_ahead(
        node_a: Any, pg_url: str) -> None:
    from pacs import outbox

    with node_a.engine.begin() as conn:
        pk = outbox.enqueue(conn, "his", "order_status", {"key": "order:1", "status": "IP"})
    (held,) = outbox.claim_due(node_a.engine, "his")
    assert held.pk == pk

    claimed = on_node_ahead("""
from pacs import outbox
result = [m.pk for m in outbox.claim_due(engine, "his")]
""", url=pg_url)["result"]
    assert claimed == []
    # A still holds its claim: its delivery is recorded as its own.
    assert outbox.renew(node_a.engine, [held]) != []


def test_an_object_compress_replaced_stays_for_its_readers_on_a_node_whose_clock_is_ahead(
        node_a: Any, pg_url: str, s3_bucket_url: str) -> None:
    from storage import open_store

    from pacs.index import tombstones

    store = open_store(s3_bucket_url, S3_ACCESS, S3_SECRET)
    key = "1.2.3.4/1.2.3.4.5/1.2.3.4.5.6.dcm"
    store.put(key, io.BytesIO(b"the original, before compress"))
    # `pacs compress` on A replaced the instance's row: the old object stays
    # READERS_GRACE for a C-MOVE that resolved it before.
    with node_a.engine.begin() as conn:
        tombstones.record(conn, [key], tombstones.REPLACED)

    sweep = """
from storage import open_store
from pacs.index import tombstones
store = open_store(args["store"], args["access"], args["secret"], create=False)
result = tombstones.finish_all(engine, store).deleted
"""
    store_args = {"url": pg_url, "store": s3_bucket_url, "access": S3_ACCESS, "secret": S3_SECRET}
    # B's sweeper round: the grace is not over by the database's clock.
    assert on_node_ahead(sweep, **store_args)["result"] == []
    assert store.exists(key)

    # Once the grace is over, B's sweeper deletes it.
    with node_a.engine.begin() as conn:
        conn.execute(update(tombstones.tombstones_t).values(
            created_at=_db_now(conn) - tombstones.READERS_GRACE))
    assert on_node_ahead(sweep, **store_args)["result"] == [key]
    assert not store.exists(key)


def test_serve_on_a_node_whose_clock_is_ahead_says_so_at_start(tmp_path: Path, pg_url: str) -> None:
    from .peers import Backend, PacsServer

    if not FAKETIME_LIB.exists():
        pytest.fail(f"libfaketime is not installed ({FAKETIME_LIB}): apt-get install -y libfaketime")
    server = PacsServer(tmp_path / "b", Backend("pg-fs", pg_url, None, {}),
                        extra_env={"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": AHEAD}).start()
    try:
        assert "s ahead of the index database's" in server.log_text()
    finally:
        server.stop()


def test_an_operators_retry_and_a_late_failure_leave_a_job_being_sent_alone(node_a: Any) -> None:
    """`pacs route retry --job N` reset a job in any state: one a node was
    sending went back to pending, and another node claimed and sent it a
    second time. A failure reported by a node whose claim had expired (the
    job taken over meanwhile) put it back too. Both wait for the claim."""
    from pacs import routing

    pk = _job(node_a)
    (claimed,) = routing.claim(node_a.engine, DESTINATION, "node-a")
    assert routing.retry(node_a.engine, pk=pk) == 0
    routing.fail(node_a.engine, claimed, "late", max_attempts=10, node="node-b")
    (row,) = routing.list_jobs(node_a.engine)
    assert (row["state"], row["claimed_by"], row["attempts"]) == ("sending", "node-a", 0)
    # Its sender's own failure counts; once its claim is over, an operator's retry takes it.
    assert routing.fail(node_a.engine, claimed, "refused", max_attempts=1, node="node-a") == "dead"
    assert routing.retry(node_a.engine, pk=pk) == 1
    (retaken,) = routing.claim(node_a.engine, DESTINATION, "node-b")
    with node_a.engine.begin() as conn:
        conn.execute(update(routing.jobs_t).where(routing.jobs_t.c.pk == pk)
                     .values(next_attempt_at=_db_now(conn) - routing.LEASE))
    assert routing.retry(node_a.engine, pk=retaken.pk) == 1  # a claim that expired: its node is gone
