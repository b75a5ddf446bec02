"""Scale-out review fixes: two `pacs serve` nodes on one PostgreSQL index and
one S3 (SeaweedFS) bucket.

- Overwrite policy (PACS_DUPLICATE_POLICY=overwrite): two nodes receiving
  different copies of one SOP Instance UID at once both answered Success, but
  the index kept the copy whose row committed last while S3 kept the copy
  uploaded last: `pacs verify` found it corrupt and WADO-RS cut frames at
  the other copy's pixel offset. Copies of one instance are now written and
  indexed one after the other (a PostgreSQL advisory lock per SOP Instance
  UID), so the row always describes the stored object.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread

from storage import ObjectStore, StorageError, open_store

from .conftest import S3_ACCESS, S3_SECRET, Backend, PacsServer, dataset_bytes
from .dicomfiles import make_ct
from .peers import S3Server, create_database, drop_database, wait_until
from .test_dicomweb_more import _parts
from .test_order_edges import Background


@pytest.fixture
def overwriting_nodes(tmp_path: Path, s3_server: S3Server) -> Iterator[tuple[PacsServer, PacsServer]]:
    """Nodes A and B, overwrite policy, sharing a fresh database and bucket."""
    pg = create_database()
    backend = Backend("pg-s3", pg, s3_server.url(f"race-{uuid.uuid4().hex[:10]}"),
                      {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET})
    env = {"PACS_DUPLICATE_POLICY": "overwrite"}
    a = PacsServer(tmp_path / "node-a", backend, extra_env={**env, "PACS_NODE_ID": "node-a"})
    b = PacsServer(tmp_path / "node-b", backend, extra_env={**env, "PACS_NODE_ID": "node-b"})
    try:
        a.start()  # first: it migrates the schema
        b.start()
        b.token = a.token
        yield a, b
    finally:
        a.stop()
        b.stop()
        drop_database(pg)


def _dsn(node: PacsServer) -> str:
    assert node.backend.index_url
    return node.backend.index_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _lock_waiters(node: PacsServer) -> int:
    """Sessions of the nodes' database waiting for a lock (row or advisory)."""
    with psycopg.connect(_dsn(node), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0


def _holds(store: ObjectStore, key: str, path: Path) -> bool:
    """Whether *key* holds the dataset of *path* (the server writes its own File Meta)."""
    try:
        return dataset_bytes(store.read_bytes(key)) == dataset_bytes(path.read_bytes())
    except StorageError:
        return False


def _stored(node: PacsServer, path: Path) -> tuple[int, str]:
    """storescu's exit code and the store response it got."""
    sent = node.storescu("-v", str(path))
    response = next((line for line in sent.stderr.splitlines() if "Received Store Response" in line), sent.stderr)
    return sent.returncode, response


def test_overwrite_copies_received_at_once_by_two_nodes_leave_the_row_of_the_stored_copy(
        overwriting_nodes: tuple[PacsServer, PacsServer], tmp_path: Path) -> None:
    """The interleaving that broke it, forced: A uploads copy 1 and its row
    waits (A's index commits are held behind another instance's row, which
    this test keeps locked); B receives copy 2 meanwhile. Before the fix B
    uploaded over copy 1 and indexed copy 2 at once, then A's row replaced it
    with copy 1: the index described bytes S3 did not hold."""
    a, b = overwriting_nodes
    held = make_ct(tmp_path / "held.dcm", PatientID="RACE0")
    assert _stored(a, held) == (0, "I: Received Store Response (Success)")
    resend = dcmread(held)
    resend.PixelData = bytes([1]) * len(resend.PixelData)
    resend.save_as(tmp_path / "held-again.dcm", enforce_file_format=True)

    first = make_ct(tmp_path / "copy1.dcm", PatientID="RACE1", PatientName="COPY^ONE")
    copy = dcmread(first)
    # Longer header, other pixels: another size, sha256 and pixel offset.
    copy.PatientName = "COPY^TWO^WITH A MUCH LONGER NAME"
    copy.PixelData = bytes([7]) * len(copy.PixelData)
    second = tmp_path / "copy2.dcm"
    copy.save_as(second, enforce_file_format=True)
    key = f"{copy.StudyInstanceUID}/{copy.SeriesInstanceUID}/{copy.SOPInstanceUID}.dcm"
    assert b.backend.storage_url
    store = open_store(b.backend.storage_url, S3_ACCESS, S3_SECRET, create=False)

    with psycopg.connect(_dsn(a)) as locker:
        locker.execute("SELECT pk FROM instances WHERE sop_uid = %s FOR UPDATE", [str(resend.SOPInstanceUID)])
        # A's committer is now stuck in the resend's transaction...
        resending = Background(lambda: _stored(a, tmp_path / "held-again.dcm"))
        assert wait_until(lambda: _lock_waiters(a) >= 1, timeout=60, interval=0.1)
        # ...so copy 1, once uploaded, waits for its row behind it.
        sending_first = Background(lambda: _stored(a, first))
        assert wait_until(lambda: _holds(store, key, first), timeout=60, interval=0.1)
        # Copy 2 on B: acknowledged at once before the fix, waits for A's copy with it.
        sending_second = Background(lambda: _stored(b, second))
        assert wait_until(lambda: not sending_second.is_alive() or _lock_waiters(a) >= 2, timeout=60, interval=0.1)
        locker.rollback()

    for sending in (resending, sending_first, sending_second):
        assert sending.outcome() == (0, "I: Received Store Response (Success)")
    with psycopg.connect(_dsn(a)) as conn:
        row = conn.execute("SELECT storage_key, size_bytes, sha256, pixel_offset FROM instances WHERE sop_uid = %s",
                           [str(copy.SOPInstanceUID)]).fetchone()
    # The second copy is written beside the first (see pacs.ingest), which
    # stays for its readers' grace (test_review_resend).
    assert row[0] == key.replace(".dcm", ".resent.dcm")
    stored = store.read_bytes(row[0])
    # The row describes the stored object: the copy last written is the one indexed.
    assert (row[1], row[2]) == (len(stored), hashlib.sha256(stored).hexdigest())
    # WADO-RS frames come from the stored copy's pixels, not from its header.
    instance = dcmread(io.BytesIO(stored))
    with b.http() as http:
        frame = http.get(f"/dicom-web/studies/{copy.StudyInstanceUID}/series/{copy.SeriesInstanceUID}"
                         f"/instances/{copy.SOPInstanceUID}/frames/1",
                         headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert [body for _, body in _parts(frame)] == [instance.PixelData]
