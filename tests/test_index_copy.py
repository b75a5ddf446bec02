"""`pacs db copy`: the embedded SQLite index moved into PostgreSQL whole,
orders, reports' users and tokens, audit trail and all, and served from
there (a hospital that outgrows the embedded default)."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_worklist_ris import _cfind_names, msa, orm, send


def test_sqlite_index_copied_into_postgresql_and_served_from_there(tmp_path: Path, pg_url: str) -> None:
    data = tmp_path / "data"
    old = PacsServer(data, Backend("sqlite", None, None, {})).start()
    try:
        assert msa(send(old, orm("CP1", "ACC9100")))[0] == "AA"
        for n in range(3):
            ct = make_ct(tmp_path / f"ct{n}.dcm", PatientID="001085012345", PatientName="Nguyễn^Văn An",
                         AccessionNumber="ACC9100", StudyInstanceUID="1.2.826.0.1.3680043.8.498.9100",
                         SeriesInstanceUID="1.2.826.0.1.3680043.8.498.9100.1")
            assert old.storescu(str(ct)).returncode == 0
        with old.http() as http:
            assert http.get("/dicom-web/studies").status_code == 200  # an audit event
        before = old.stats()
        with old.http() as http:  # FHIR meta.lastUpdated: the copy changes nothing the study and patient show
            updated = http.get("/fhir/ImagingStudy/1.2.826.0.1.3680043.8.498.9100").json()["meta"]["lastUpdated"]
            patient_updated = http.get("/fhir/Patient/CCCD.001085012345").json()["meta"]["lastUpdated"]
        audit_before = len(json.loads(old.cli("audit", "--format", "json").stdout))
        while_serving = old.cli("db", "copy", "--to", pg_url, check=False)
        assert while_serving.returncode == 1 and "pacs serve runs on" in while_serving.stderr
    finally:
        old.stop()
    copied = json.loads(old.cli("db", "copy", "--to", pg_url, "--switch", "--json").stdout)
    assert copied["switched"] and copied["rows"]["instances"] == 3 and copied["rows"]["orders"] == 1
    assert json.loads(old.cli("stats", "--json").stdout)["instances"] == 3  # now read from the config's index_url
    assert "the target is the current index" in old.cli("db", "copy", "--to", pg_url, check=False).stderr
    again = old.cli("db", "copy", "--to", pg_url, "--index-url", f"sqlite:///{data}/index.sqlite", check=False)
    assert again.returncode == 1 and "already holds data" in again.stderr

    new = PacsServer(data, Backend("pg", pg_url, None, {}), token=old.token).start()
    try:
        assert {k: new.stats()[k] for k in before} == before
        with new.http() as http:
            copied_study = http.get("/fhir/ImagingStudy/1.2.826.0.1.3680043.8.498.9100").json()
            assert copied_study["meta"]["lastUpdated"] == updated
            # Its identifiers, copied after it, moved it in the copy (migration 0024's triggers): set back.
            assert http.get("/fhir/Patient/CCCD.001085012345").json()["meta"]["lastUpdated"] == patient_updated
        assert _cfind_names(new, PatientName="NGUYEN*") == [("Nguyễn^Văn An", "001085012345",
                                                             "1.2.826.0.1.3680043.8.498.9100")]
        with new.http() as http:  # the copied token still works
            order = http.get("/api/orders/ACC9100")
            assert order.status_code == 200 and order.json()["patient_id"] == "001085012345"
        # New rows get new keys (the sequences start after the copied ones) and the counters are right.
        assert new.storescu(str(make_ct(tmp_path / "ct3.dcm", StudyInstanceUID="1.2.826.0.1.3680043.8.498.9100",
                                        SeriesInstanceUID="1.2.826.0.1.3680043.8.498.9100.1",
                                        PatientID="001085012345", PatientName="Nguyễn^Văn An"))).returncode == 0
        assert msa(send(new, orm("CP2", "ACC9101")))[0] == "AA"
        with new.http() as http:
            study = http.get("/dicom-web/studies", params={"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.9100"})
            assert study.json()[0]["00201208"]["Value"] == [4]
        assert len(json.loads(new.cli("audit", "--format", "json").stdout)) >= audit_before
    finally:
        new.stop()


def test_copy_of_a_postgresql_index_is_refused_while_a_node_serves_it(tmp_path: Path, pg_url: str) -> None:
    """Another node serving the shared index from another machine (no lock
    on this data dir): the copy would miss what it stores meanwhile."""
    import psycopg

    from pacs.index import create_index_engine, upgrade_schema

    engine = create_index_engine(pg_url)
    try:
        upgrade_schema(engine)
    finally:
        engine.dispose()
    server = PacsServer(tmp_path / "data", Backend("pg", pg_url, None, {}))
    (tmp_path / "data").mkdir()
    target = f"sqlite:///{tmp_path}/copy.sqlite"
    libpq = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, application_name="filmless-pacs 0013"):
        refused = server.cli("db", "copy", "--to", target, check=False)
        assert refused.returncode == 1 and "the index is in use" in refused.stderr, refused.stderr
    copied = json.loads(server.cli("db", "copy", "--to", target, "--json").stdout)
    assert copied["rows"]["instances"] == 0 and not copied["switched"]
