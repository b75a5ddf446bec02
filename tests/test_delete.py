"""Deleting a study, series or instance sent in error (`pacs delete`,
`DELETE /api/studies/...`): admin only, a reason required and audited,
objects gone from the store after the index rows, counters and modalities
kept right, a signed report protected unless forced, and an interrupted
deletion finished (not undone) by `pacs verify --repair`. Both backends."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .conftest import PacsServer
from .dicomfiles import make_ct

NAME = "Trần^Thị Bích"


def _study(server: PacsServer, folder: Path, patient: str, series: dict[str, int]) -> tuple[str, dict[str, list[str]]]:
    """Send one study with *series* (modality -> count); its UID and SOP UIDs by series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    sops: dict[str, list[str]] = {}
    files = []
    for modality, count in series.items():
        series_uid = generate_uid()
        for n in range(count):
            path = make_ct(folder / f"{modality}-{n}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series_uid,
                           Modality=modality, PatientID=patient, PatientName=NAME, InstanceNumber=n + 1,
                           SpecificCharacterSet="ISO_IR 192")
            files.append(str(path))
            sops.setdefault(series_uid, []).append(path.name)
    assert server.storescu(*files).returncode == 0
    with server.http() as http:
        listed = http.get(f"/api/studies/{study}").json()
    by_series = {s["series_uid"]: [i["sop_uid"] for i in s["instances"]] for s in listed["series"]}
    return study, by_series


def _keys(server: PacsServer, study: str) -> list[str]:
    from sqlalchemy import select

    from pacs.index.models import Instance, Series, Study

    core = server.core()
    try:
        with core.engine.connect() as conn:
            return list(conn.execute(
                select(Instance.storage_key).join(Series, Series.pk == Instance.series_pk)
                .join(Study, Study.pk == Series.study_pk).where(Study.study_uid == study)).scalars())
    finally:
        core.close()


def _stored(server: PacsServer, key: str) -> bool:
    core = server.core()
    try:
        return core.store.stat(key) is not None
    except Exception:
        return False
    finally:
        core.close()


def _qido_counts(http: Any, study: str) -> tuple[int, int, str]:
    """(series, instances, modalities) of *study* as QIDO-RS answers them."""
    found = http.get("/dicom-web/studies", params={"StudyInstanceUID": study,
                                                   "includefield": "00201206,00201208,00080061"}).json()
    (attrs,) = found
    return (attrs["00201206"]["Value"][0], attrs["00201208"]["Value"][0], "\\".join(attrs["00080061"]["Value"]))


def _deletes(server: PacsServer, study: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        with server.http() as http:
            events = [e for e in http.get("/api/audit", params={"study": study, "action": "delete"}).json()
                      if e["outcome"] == "success"]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


def test_instance_series_and_study_deletion_over_http(pacs_server: PacsServer, tmp_path: Path) -> None:
    server = pacs_server
    study, series = _study(server, tmp_path / "s", "DEL-1", {"CT": 3, "SR": 1})
    ct_series = next(uid for uid, sops in series.items() if len(sops) == 3)
    sr_series = next(uid for uid in series if uid != ct_series)
    keys = _keys(server, study)
    assert len(keys) == 4 and all(_stored(server, k) for k in keys)
    radiologist = server.make_token("bs.lan", "radiologist")
    base = f"/api/studies/{study}"
    with server.http(radiologist) as http:
        assert http.delete(base, params={"reason": "gửi nhầm"}).status_code == 403
    with server.http() as http:
        assert http.delete(base).status_code in (400, 422)  # no reason
        assert http.delete(f"/api/studies/{generate_uid()}", params={"reason": "x"}).status_code == 404
        assert http.delete(f"{base}/series/{generate_uid()}", params={"reason": "x"}).status_code == 404

        # One instance: the series and study counters follow.
        gone = series[ct_series][0]
        one = http.delete(f"{base}/series/{ct_series}/instances/{gone}", params={"reason": "ảnh thử"})
        assert one.status_code == 200, one.text
        assert one.json()["instances"] == 1 and one.json()["objects_deleted"] == 1
        assert _qido_counts(http, study) == (2, 3, "CT\\SR")
        assert http.get(f"/dicom-web/studies/{study}/series/{ct_series}/instances/{gone}").status_code == 404

        # The SR series: the study's modalities no longer list it.
        assert http.delete(f"{base}/series/{sr_series}", params={"reason": "sai chuỗi"}).status_code == 200
        assert _qido_counts(http, study) == (1, 2, "CT")

        # The study: gone from every API, its objects from the store, the patient with it.
        whole = http.delete(base, params={"reason": "gửi nhầm bệnh nhân"})
        assert whole.status_code == 200 and whole.json()["instances"] == 2, whole.text
        assert http.get(base).status_code == 404
        assert http.get("/dicom-web/studies", params={"PatientID": "DEL-1"}).json() == [] or \
            http.get("/dicom-web/studies", params={"PatientID": "DEL-1"}).status_code == 204
    assert not any(_stored(server, k) for k in keys)
    assert server.stats()["instances"] == 0 and server.stats()["patients"] == 0
    verified = json.loads(server.cli("verify", "--json").stdout)
    assert verified["orphans"]["count"] == 0 and verified["missing"]["count"] == 0, verified
    events = _deletes(server, study, 3)
    assert len(events) == 3 and {e["user"] for e in events} == {"pacs-test"}
    assert any("reason: gửi nhầm bệnh nhân" in e["detail"] and e["detail"].startswith("study ") for e in events)
    assert all(e["patient_id"] == "DEL-1" for e in events)


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_signed_report_protects_its_study_and_the_cli_dry_runs(pacs_server: PacsServer, tmp_path: Path) -> None:
    server = pacs_server
    study, _ = _study(server, tmp_path / "s", "DEL-2", {"CT": 2})
    radiologist = server.make_token("bs.lan", "radiologist")
    with server.http(radiologist) as rad:
        assert rad.put(f"/api/studies/{study}/report", json={"findings": "Bình thường.", "impression": "Không."}
                       ).status_code == 200
        assert rad.post(f"/api/studies/{study}/report/sign").status_code == 200
    with server.http() as http:
        refused = http.delete(f"/api/studies/{study}", params={"reason": "nhầm"})
        assert refused.status_code == 409 and "signed report" in refused.text
        # Its images one series at a time are the same record: refused as well.
        ct_series = http.get(f"/api/studies/{study}").json()["series"][0]["series_uid"]
        refused = http.delete(f"/api/studies/{study}/series/{ct_series}", params={"reason": "nhầm"})
        assert refused.status_code == 409 and "signed report" in refused.text
        assert http.delete(f"/api/studies/{study}/series/1.2.abc", params={"reason": "x"}).status_code == 400
    refused = server.cli("delete", study, "--reason", "nhầm", "--yes", check=False)
    assert refused.returncode == 1 and "signed report" in refused.stderr
    dry = json.loads(server.cli("delete", study, "--reason", "nhầm", "--force", "--json").stdout)
    assert dry["dry_run"] and dry["instances"] == 3 and dry["reports_deleted"] == 1  # 2 CT + the report's PDF
    assert server.stats()["instances"] == 3
    assert server.cli("delete", study, "--reason", " ", "--yes", check=False).returncode == 2
    assert server.cli("delete", study, "--instance", generate_uid(), "--reason", "x", check=False).returncode == 2
    done = json.loads(server.cli("delete", study, "--reason", "bệnh nhân yêu cầu", "--force", "--yes", "--json").stdout)
    assert not done["dry_run"] and done["reports_deleted"] == 1 and done["objects_deleted"] == 3
    assert server.stats()["studies"] == 0
    events = _deletes(server, study, 1)
    assert len(events) == 1 and events[0]["protocol"] == "cli" and "1 reports; reason: bệnh nhân yêu cầu" in events[0]["detail"]


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_an_interrupted_deletion_is_finished_not_undone(pacs_server: PacsServer, tmp_path: Path) -> None:
    """A deletion that committed its index change but died before deleting
    the objects leaves them in its journal: verify --repair deletes them
    instead of adopting them back into the index."""
    server = pacs_server
    study, _ = _study(server, tmp_path / "s", "DEL-3", {"CT": 2})
    keys = _keys(server, study)
    core = server.core()
    try:
        from sqlalchemy import delete

        from pacs.index.models import Study

        (server.data_dir / "delete-interrupted.journal").write_text("".join(k + "\n" for k in keys))
        with core.engine.begin() as conn:
            conn.execute(delete(Study).where(Study.study_uid == study))
    finally:
        core.close()
    assert all(_stored(server, k) for k in keys)
    checked = json.loads(server.cli("verify", "--json", check=False).stdout)
    assert checked["pending_purge"] == 2 and checked["orphans"]["count"] == 0  # named by the journal
    repaired = json.loads(server.cli("verify", "--repair", "--json", check=False).stdout)
    assert repaired["purged_leftovers"] == 2, repaired
    assert not any(_stored(server, k) for k in keys)
    assert server.stats()["instances"] == 0
    assert not (server.data_dir / "delete-interrupted.journal").exists()


def test_an_instance_resent_during_the_deletion_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The objects' keys follow their UIDs: a modality resending an instance
    of a study being deleted, once its rows are gone and before its objects
    are, stores and indexes it under the same key, acknowledged. The
    deletion must not then delete that object (it did: an index row without
    its object)."""
    from pacs.app import Pacs
    from pacs.ingest import Origin
    from pacs.maintenance import delete as deletion
    from pacs.maintenance.verify import verify
    from pacs.settings import load_settings

    study = generate_uid()
    files = [make_ct(tmp_path / f"{n}.dcm", StudyInstanceUID=study, PatientID="DEL-4") for n in range(3)]
    pacs = Pacs.open(load_settings(data_dir=tmp_path / "data"))
    try:
        for path in files:
            assert pacs.ingest_file(path, Origin(source="import")).conflict is None
        check = deletion.indexed_among

        def resend_first(engine: Any, keys: list[str]) -> set[str]:
            resent = pacs.ingest_file(files[0], Origin(source="dimse", calling_ae="CT1"))
            assert resent.conflict is None  # acknowledged as stored
            return check(engine, keys)

        monkeypatch.setattr(deletion, "indexed_among", resend_first)
        report = deletion.delete_target(pacs, deletion.Target(study), reason="gửi nhầm", user="tester")
        assert report.instances == 3 and report.objects_deleted == 2 and report.kept_resent == 1
        checked = verify(pacs).as_dict()
        assert checked["ok"] and checked["checked"] == 1, checked
    finally:
        pacs.close()
