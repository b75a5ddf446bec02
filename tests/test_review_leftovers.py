"""Defects earlier reviews noticed and left alone, each against real peers
(a real `pacs serve`, DCMTK / pynetdicom, PostgreSQL, SeaweedFS S3):

1. overwrite policy: a resend replaced the stored object under its key
   before the index commit; when that commit failed (the sender was told
   0xA703) the row still described the old bytes (size, sha256, frames)
   while the store held the new ones, and the acknowledged copy was gone.
   The replacement is now written under a key of its own and the row
   switched to it in the commit; the old object goes only after.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom import dcmread
from sqlalchemy import select

from .conftest import Backend, PacsServer, make_backend
from .dicomfiles import make_ct
from .test_dimse_failures import scu_store_file

INDEX_FAILED = 0xA703


# -- 1: overwrite policy, a resend whose index commit fails ---------------------------
@pytest.fixture(params=["sqlite-fs", "pg-s3"])
def overwriting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PacsServer]:
    """An archive under the overwrite policy (one test's)."""
    backend: Backend = make_backend(request.param, request)
    server = PacsServer(tmp_path / "data", backend, extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}).start()
    yield server
    server.stop()


def _index_updates_fail(server: PacsServer, failing: bool) -> None:
    """Make every UPDATE of an instance row fail in the index itself (a
    trigger raising), as an index that takes no writes does; or stop it."""
    if server.backend.index_url:
        statements = (["CREATE FUNCTION review_index_down() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN RAISE EXCEPTION 'index down (test)'; END $$",
                       "CREATE TRIGGER review_index_down BEFORE UPDATE ON instances "
                       "FOR EACH ROW EXECUTE FUNCTION review_index_down()"] if failing else
                      ["DROP TRIGGER review_index_down ON instances", "DROP FUNCTION review_index_down()"])
        with psycopg.connect(server.backend.index_url.replace("postgresql+psycopg", "postgresql"),
                             autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)
        return
    with sqlite3.connect(server.data_dir / "index.sqlite", timeout=30) as conn:
        conn.execute("CREATE TRIGGER review_index_down BEFORE UPDATE ON instances BEGIN "
                     "SELECT RAISE(ABORT, 'index down (test)'); END" if failing else
                     "DROP TRIGGER review_index_down")


def _stored(server: PacsServer, sop_uid: str) -> tuple[Any, bytes, list[str]]:
    """(the instance's row, the bytes under its key, every key the store holds)."""
    from pacs.index.models import Instance

    core = server.core()
    try:
        with core.engine.connect() as conn:
            row = conn.execute(select(Instance.storage_key, Instance.sha256, Instance.size_bytes)
                               .where(Instance.sop_uid == sop_uid)).one()
        return row, core.store.read_bytes(row.storage_key), sorted(info.key for info in core.store.list())
    finally:
        core.close()


def _verify_clean(server: PacsServer) -> None:
    result = server.cli("verify", "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], report


def test_overwrite_resend_failing_its_index_commit_keeps_the_acknowledged_copy(
        overwriting: PacsServer, tmp_path: Path) -> None:
    first = make_ct(tmp_path / "first.dcm", PatientName="FIRST^VERSION", PatientID="OVR1")
    assert scu_store_file(overwriting, first) == 0
    second = dcmread(first)
    second.PatientName = "SECOND^VERSION^LONGER"
    second.save_as(tmp_path / "second.dcm")
    sop = str(second.SOPInstanceUID)

    _index_updates_fail(overwriting, True)
    try:
        assert scu_store_file(overwriting, tmp_path / "second.dcm") == INDEX_FAILED
    finally:
        _index_updates_fail(overwriting, False)
    row, data, keys = _stored(overwriting, sop)
    # The acknowledged copy is still stored, as its row describes it.
    assert b"FIRST^VERSION" in data and b"SECOND^VERSION" not in data
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (row.sha256, row.size_bytes)
    assert keys == [row.storage_key]  # the refused copy is not left behind
    _verify_clean(overwriting)

    # The modality's retry replaces it: one object, the one the row describes.
    assert scu_store_file(overwriting, tmp_path / "second.dcm") == 0
    row, data, keys = _stored(overwriting, sop)
    assert b"SECOND^VERSION" in data
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (row.sha256, row.size_bytes)
    assert keys == [row.storage_key]
    # And again (the key it was replaced under is taken now).
    assert scu_store_file(overwriting, first) == 0
    row, data, keys = _stored(overwriting, sop)
    assert b"FIRST^VERSION" in data and keys == [row.storage_key]
    assert hashlib.sha256(data).hexdigest() == row.sha256
    _verify_clean(overwriting)
