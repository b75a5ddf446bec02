"""Review of the patient corrections over JSON and from the command line
(`PUT /api/patients/{id}`, `POST /api/patients/merge`, `pacs patient`):
each test is a bug found, against a real `pacs serve` on SQLite and
PostgreSQL, checked with DCMTK findscu, WADO-RS and QIDO-RS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import create_database, drop_database
from .test_merge_review import _store


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    pg = create_database() if request.param == "pg" else None
    server = PacsServer(tmp_path_factory.mktemp(f"review-patients-{request.param}") / "data",
                        Backend(request.param, pg, None, {}))
    server.start()
    server.his_token = server.make_token("u-his", "his")  # type: ignore[attr-defined]
    yield server
    server.stop()
    if pg:
        drop_database(pg)


def _his(server: PacsServer) -> object:
    return server.http(token=server.his_token)  # type: ignore[attr-defined]


def test_cli_refuses_a_birth_date_that_is_not_yyyymmdd(archive: PacsServer, tmp_path: Path) -> None:
    """`pacs patient update --birth-date 1985-03-14` (or "1985") deleted the
    stored birth date and exited 0: a date not of 8 digits went to the HL7
    rule for partial dates, which empties a date it does not agree with."""
    _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-BD", PatientName="PHAM^VAN C",
                            PatientBirthDate="19850314", PatientSex="M"))
    for bad in ("1985-03-14", "1985", "abcdefgh"):
        refused = archive.cli("patient", "update", "RV-BD", "--birth-date", bad, "--reason", "x", check=False)
        assert refused.returncode == 2 and "YYYYMMDD" in refused.stderr, (bad, refused.returncode, refused.stderr)
    shown = json.loads(archive.cli("patient", "show", "RV-BD", "--json").stdout)
    assert shown["birth_date"] == "19850314"
