"""Fixtures that start the real peers: PostgreSQL databases, a SeaweedFS S3
server, DCMTK tools and `pacs serve` processes (see :mod:`tests.peers`).

Nothing is mocked and nothing is skipped: a missing peer is a test failure
with a message saying how to install it (`bash scripts/test.sh` installs everything).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pynetdicom.association import Association

from pacs.dicom_net import handed_back

from .peers import (
    PACS,
    PG_ADMIN,
    S3_ACCESS,
    S3_SECRET,
    Backend,
    PacsServer,
    PeerMissing,
    S3Server,
    create_database,
    dataset_bytes,
    drop_database,
    free_port,
    run_dcmtk,
    start_s3,
    wait_port,
    weed_ports,
)

# The tests' commands never read a service's settings file installed on this
# machine (/etc/filmless-pacs.env): only what each test sets.
os.environ.setdefault("PACS_ENV_FILE", "")

# pynetdicom's requesting side loses a response now and then in a race of
# its reactor's pause (see pacs.dicom_net.keep_responses, which our own
# associations get). The tests' clients that call AE.associate themselves
# get the same hand-back, so that race never fails a test of the server.
PYNETDICOM_SERVE_REQUEST = Association._serve_request


def _serve_request_keeping_responses(self: Association, message: Any, context_id: int) -> None:
    if not (self.is_requestor and handed_back(self, message, context_id)):
        PYNETDICOM_SERVE_REQUEST(self, message, context_id)


Association._serve_request = _serve_request_keeping_responses  # type: ignore[method-assign]

__all__ = [
    "PACS", "S3_ACCESS", "S3_SECRET", "Backend", "PacsServer", "S3Server", "dataset_bytes",
    "free_port", "run_dcmtk", "wait_port", "weed_ports", "pydicom_file",
]


# -- PostgreSQL -------------------------------------------------------------------
def _pg_ready() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def postgres() -> str:
    """An admin URL of the local PostgreSQL, started if it is down."""
    if not _pg_ready():
        versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
        if not versions:
            pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql (bash .ci/run does it)")
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", "start"], check=False
        )
        for _ in range(60):
            if _pg_ready():
                break
            time.sleep(0.5)
        else:
            pytest.fail("PostgreSQL on 127.0.0.1:5432 did not come up")
    return PG_ADMIN


@pytest.fixture
def pg_url(postgres: str) -> Iterator[str]:
    """A fresh database for one test, its schema made as by a first start
    but without rows; dropped afterwards."""
    url = create_database(postgres)
    yield url
    drop_database(url, postgres)


@pytest.fixture
def pg_empty_url(postgres: str) -> Iterator[str]:
    """A fresh database nothing has touched (tests of the migrations); dropped afterwards."""
    url = create_database(postgres, empty=True)
    yield url
    drop_database(url, postgres)


# -- SeaweedFS (S3)
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on loopback for the whole session."""
    try:
        server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    except PeerMissing as exc:
        pytest.fail(str(exc))
    yield server
    server.kill()  # its data goes with the session's temporary folder


@pytest.fixture
def s3_bucket_url(s3_server: S3Server) -> str:
    return s3_server.url(f"pacs-{uuid.uuid4().hex[:10]}")


# -- backends ---------------------------------------------------------------------
BACKENDS = ["sqlite-fs", "pg-s3"]
ALL_BACKENDS = ["sqlite-fs", "sqlite-s3", "pg-fs", "pg-s3"]


def make_backend(name: str, request: pytest.FixtureRequest) -> Backend:
    index, store = name.split("-")
    index_url = request.getfixturevalue("pg_url") if index == "pg" else None
    env: dict[str, str] = {}
    storage_url = None
    if store == "s3":
        storage_url = request.getfixturevalue("s3_bucket_url")
        env = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
    return Backend(name, index_url, storage_url, env)


@contextmanager
def shared_backend(name: str, request: pytest.FixtureRequest, bucket: str) -> Iterator[Backend]:
    """*name*'s backend for an archive a whole module shares (pg_url and
    s3_bucket_url are per test): a fresh database on the session's
    PostgreSQL, dropped afterwards, and a fresh bucket *bucket*-... on its
    SeaweedFS."""
    index, store = name.split("-")
    postgres = request.getfixturevalue("postgres") if index == "pg" else None
    index_url = create_database(postgres) if postgres else None
    env: dict[str, str] = {}
    storage_url = None
    if store == "s3":
        storage_url = request.getfixturevalue("s3_server").url(f"{bucket}-{uuid.uuid4().hex[:10]}")
        env = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
    try:
        yield Backend(name, index_url, storage_url, env)
    finally:
        if index_url and postgres:
            drop_database(index_url, postgres)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """SQLite + filesystem (the embedded default) and PostgreSQL + S3."""
    return make_backend(request.param, request)


# -- pacs serve ----------------------------------------------------------------
@pytest.fixture
def pacs_server(tmp_path: Path, backend: Backend) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", backend).start()
    yield server
    server.stop()
    if server.proc is not None and server.proc.returncode not in (0, -signal.SIGTERM):
        print(server.log_text()[-5000:])


# -- data -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick variant of the synthetic sample studies, generated once."""
    from sample_studies.generate import generate_all

    out = tmp_path_factory.mktemp("samples")
    generate_all(out, quick=True)
    return out


def pydicom_file(name: str) -> Path:
    """A file bundled with pydicom or pydicom-data, never downloaded."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"test file {name} not found (pip install pydicom-data)")
    return Path(path)


# -- order ------------------------------------------------------------------------
# The longest files (measured with --durations=0) run first, so that the run
# does not end on one worker alone with a long file.
LONGEST_FIRST = (
    "test_report_digital_signature.py", "test_routing.py", "test_dimse_failures.py", "test_transcode_stream.py",
    "test_worklist_review.py", "test_dimse_ingest.py", "test_review_templates.py", "test_fuzz.py",
    "test_auth_hardening.py", "test_install_review.py", "test_reports_fhir.py", "test_report_templates.py",
    "test_worklist_ris.py", "test_multiframe_review.py", "test_integrity_review.py", "test_query_retrieve.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
