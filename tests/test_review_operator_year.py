"""A year of maintenance by the hospital's one IT person, reviewed: backups
restored, the index copied, the objects migrated, with the features added
lately (rejection notes, signatures, templates, share links) kept right."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pacs.index.db import SCHEMA_HEAD

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_rejections import REJECTED, _note

STUDY = "1.2.826.0.1.3680043.8.498.77001"
SERIES = STUDY + ".1"


def _files(tmp_path: Path, count: int) -> list[Path]:
    """A CT series of *count* instances ({SERIES}.0, .1, ...) as files."""
    folder = tmp_path / "ct"
    folder.mkdir(exist_ok=True)
    return [make_ct(folder / f"{i}.dcm", sop_uid=f"{SERIES}.{i}", StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES,
                    PatientID="BN77001", PatientName="TRAN^VAN BINH", InstanceNumber=i + 1, StudyDate="20250101")
            for i in range(count)]


def _indexed_sops(server: PacsServer) -> set[str]:
    from sqlalchemy import select

    from pacs.maintenance.common import instances_t

    core = server.core()
    try:
        with core.engine.connect() as conn:
            return set(conn.execute(select(instances_t.c.sop_uid)).scalars())
    finally:
        core.close()


def test_a_rejection_made_after_the_backup_holds_after_restore_and_repair(tmp_path: Path) -> None:
    """Last night's backup is restored (the README's recovery: restore, then
    `pacs verify --repair`). An image withdrawn by a rejection note today
    came back: the restored index still listed it (its object deleted),
    repair adopted the note without applying it, the rejection was gone
    and the modality's resend was taken. Repair now withdraws again what an
    adopted note lists whose objects are gone; a note whose images are all
    still stored (one that was never applied) withdraws nothing."""
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    files = _files(tmp_path, 4)
    assert json.loads(server.cli("import", *map(str, files[:3]), "--json").stdout)["stored"] == 3
    backup = tmp_path / "nightly.bak"
    server.cli("backup", "--out", str(backup))
    server.cli("import", str(files[3]))  # received after the backup, rejected with .0
    server.cli("rejections", "reject", "--study", STUDY, f"{SERIES}.0", f"{SERIES}.3", "--reason", "sai bệnh nhân",
               "--yes")
    # A note that was stored but never applied (its sender might not reject): its image stays.
    unapplied = _note(tmp_path / "unapplied.dcm", STUDY, "BN77001", REJECTED, {STUDY: [SERIES, f"{SERIES}.2"]})
    core = server.core()
    try:
        import pydicom

        ds = pydicom.dcmread(unapplied, stop_before_pixels=True)
        core.store.put(f"{STUDY}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm", io.BytesIO(unapplied.read_bytes()))
    finally:
        core.close()

    server.cli("restore", str(backup), "--yes")
    repaired = server.cli("verify", "--repair", "--json", check=False)
    report = json.loads(repaired.stdout)
    assert repaired.returncode == 0 and len(report["adopted"]["items"]) == 2, repaired.stdout
    assert [(n["instances"], n["not_stored"]) for n in report["withdrawn_again"]["items"]] == [(1, 1)], report
    assert server.cli("verify", "--json", check=False).returncode == 0  # nothing missing any more
    assert f"{SERIES}.0" not in _indexed_sops(server) and f"{SERIES}.2" in _indexed_sops(server)
    listed = json.loads(server.cli("rejections", "list", "--json").stdout)
    assert sorted(r["sop_uid"] for r in listed["rejected"]) == [f"{SERIES}.0", f"{SERIES}.3"], listed
    resent = json.loads(server.cli("import", str(files[0]), str(files[3]), "--json", check=False).stdout)
    assert resent["rejected"] == 2 and resent["stored"] == 0, resent


def test_a_signed_report_still_verifies_after_the_index_is_rebuilt(tmp_path: Path) -> None:
    """The index is lost and rebuilt from the store (`pacs reindex`: "signed
    reports come back as their PDF instances"). The digitally signed PDF
    is in the study, byte for byte, but `pacs report verify` answered "no
    signed report" (exit 1): it only looked for report rows, which lived in
    the lost index. It verifies the study's stored report PDF then."""
    from .test_report_digital_signature import P12_PASSWORD, PIN, SIGNER_CN, Pki, import_cert

    pki = Pki(tmp_path / "pki")
    p12 = pki.p12("nhung", SIGNER_CN)
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}),
                        extra_env={"PACS_REPORT_SIGNATURE": "radiologist", "PACS_REPORT_TRUST_ROOTS": str(pki.ca_pem)})
    server.cli("import", *map(str, _files(tmp_path, 2)))
    server.start()
    try:
        radiologist = server.make_token("bs.nhung", "radiologist", "BS. Nhung")
        imported = import_cert(server, "bs.nhung", p12, f"{P12_PASSWORD}\n{PIN}\n")
        assert imported.returncode == 0, imported.stdout + imported.stderr
        with server.http(radiologist) as http:
            assert http.put(f"/api/studies/{STUDY}/report",
                            json={"findings": "Bình thường.", "impression": "Không bất thường."}).status_code == 200
            signed = http.post(f"/api/studies/{STUDY}/report/sign", json={"pin": PIN})
            assert signed.status_code == 200, signed.text
    finally:
        server.stop()
    before = json.loads(server.cli("report", "verify", STUDY, "--json").stdout)
    assert before["signed"] and before["intact"] and before["trusted"], before

    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (server.data_dir / name).unlink(missing_ok=True)
    server.cli("reindex", "--json")
    for version in ([], ["--version", "1"]):
        done = server.cli("report", "verify", STUDY, *version, "--json", check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        after = json.loads(done.stdout)
        assert (after["version"], after["signed"], after["intact"], after["trusted"]) == (1, True, True, True), after
        assert after["pdf_sop_uid"] == before["pdf_sop_uid"] and SIGNER_CN in after["signed_by"], after
    assert server.cli("report", "verify", STUDY, "--version", "2", check=False).returncode == 1
    core = server.core()
    try:  # the PDF's object lost too: nothing to verify, said so
        core.store.delete(next(i.storage_key for i in core.reader.iter_stored(STUDY)
                               if i.sop_uid == before["pdf_sop_uid"]))
    finally:
        core.close()
    lost = server.cli("report", "verify", STUDY, check=False)
    assert lost.returncode == 1 and "no signed report" in lost.stderr, lost.stdout + lost.stderr


def _set_revision(url: str, revision: str) -> None:
    from sqlalchemy import text

    from pacs.index import create_index_engine

    engine = create_index_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_a_backup_of_a_newer_version_is_refused_before_the_index_is_replaced(tmp_path: Path, kind: str,
                                                                              request: pytest.FixtureRequest) -> None:
    """The IT person rolls back an upgrade and restores the wrong file: a
    backup taken after the upgrade, whose schema this version does not
    know. The restore replaced the index with it, then stopped with a
    SchemaError ("written by a newer version"): the archive could not open
    its index any more. The backup's revision is checked first: refused,
    the index left as it was."""
    url = request.getfixturevalue("pg_url") if kind == "pg" else None
    server = PacsServer(tmp_path / "data", Backend(kind, url, None, {}))
    server.cli("import", *map(str, _files(tmp_path, 2)))
    index = url or f"sqlite:///{server.data_dir}/index.sqlite"
    backup = tmp_path / "after-upgrade.bak"
    if kind == "sqlite":
        server.cli("backup", "--out", str(backup))
        _set_revision(f"sqlite:///{backup}", "0099")
    else:  # the newer version's index, backed up (its audit event refused: not this version's schema)
        _set_revision(index, "0099")
        server.cli("backup", "--out", str(backup))
        _set_revision(index, SCHEMA_HEAD)
    refused = server.cli("restore", str(backup), "--yes", check=False)
    assert refused.returncode == 1 and "newer version" in refused.stderr and "left as it is" in refused.stderr, (
        refused.stdout + refused.stderr)
    assert "Traceback" not in refused.stderr
    assert server.stats()["instances"] == 2
    assert server.cli("db", "current").stdout.strip().endswith(SCHEMA_HEAD)


def test_reindex_names_the_patient_corrections_and_share_links_it_cannot_rebuild(tmp_path: Path) -> None:
    """A study sent under the wrong patient was moved to the right one
    (`pacs patient move-study`: a correction in the index, the objects
    unchanged). After the index was lost and rebuilt, the study was filed
    under the wrong patient again, and the patient's share link was gone,
    while the rebuild's list of what it cannot give back named neither."""
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    server.cli("import", *map(str, _files(tmp_path, 1)))
    other = make_ct(tmp_path / "other.dcm", PatientID="BN77002", PatientName="LE^THI C")
    server.cli("import", str(other))
    server.cli("patient", "move-study", STUDY, "--to", "BN77002", "--reason", "gửi nhầm bệnh nhân", "--yes")
    server.cli("share", "create", STUDY)
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (server.data_dir / name).unlink(missing_ok=True)
    rebuilt = json.loads(server.cli("reindex", "--json").stdout)
    assert rebuilt["indexed"] == 2
    # Filed under the wrong patient again (BN77001 has its study back): say so.
    assert json.loads(server.cli("patient", "show", "BN77001", "--json").stdout)["studies"] == 1
    said = " ".join(rebuilt["warnings"])
    assert "patient corrections" in said and "move-study" in said and "share links" in said, said


def test_a_lifted_rejection_note_stays_off_the_patients_cd(tmp_path: Path) -> None:
    """An image withdrawn by mistake was let in again (`pacs rejections
    lift`, the modality sent it again) and reported on. The patient's CD
    carried the stale rejection note with it: the other hospital's PACS
    (here `pacs import`, as IHE IOCM has every archive do) withdrew the image
    on import. A note listing an image the archive keeps is left out of an
    export, and said so in its warnings."""
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    files = _files(tmp_path, 3)
    server.cli("import", *map(str, files))
    server.cli("rejections", "reject", "--study", STUDY, f"{SERIES}.0", "--reason", "nhầm", "--yes")
    server.cli("rejections", "lift", f"{SERIES}.0", "--reason", "ảnh đúng, từ chối nhầm", "--yes")
    assert json.loads(server.cli("import", str(files[0]), "--json").stdout)["stored"] == 1

    exported = json.loads(server.cli("export", STUDY, "--out", str(tmp_path / "cd"), "--media", "--json").stdout)
    assert exported["instances"] == 3, exported
    assert [w["detail"] for w in exported["warnings"]["items"]] == [
        "rejection note left out: it lists images this archive keeps (a rejection lifted, or a note not applied); "
        "the receiver would withdraw them"], exported
    other = PacsServer(tmp_path / "other", Backend("sqlite", None, None, {}))
    imported = json.loads(other.cli("import", str(tmp_path / "cd" / "DICOMDIR"), "--json").stdout)
    assert (imported["stored"], imported["withdrawn"]) == (3, 0), imported
    assert _indexed_sops(other) == {f"{SERIES}.{n}" for n in range(3)}

    # The note's object lost from the store: the export goes on, the note failed as any missing object.
    note = exported["warnings"]["items"][0]["sop_uid"]
    core = server.core()
    try:
        core.store.delete(next(i.storage_key for i in core.reader.iter_stored(STUDY) if i.sop_uid == note))
    finally:
        core.close()
    again = server.cli("export", STUDY, "--out", str(tmp_path / "again.zip"), "--json", check=False)
    report = json.loads(again.stdout)
    assert again.returncode == 1 and report["instances"] == 3, report
    assert [f["sop_uid"] for f in report["failed"]["items"]] == [note], report


def test_a_backup_of_the_other_kind_of_index_points_to_db_copy(tmp_path: Path, pg_url: str) -> None:
    """The index was copied to PostgreSQL (`pacs db copy --switch`) and the
    IT person restores last month's SQLite backup: refused, rightly, but the
    advice was `pacs reindex` into the new database, which loses orders,
    reports, users and the audit trail. It names the whole way: restore into
    a SQLite index, then `pacs db copy`. A PostgreSQL dump given to a SQLite
    index is named as one too (it was "file is not a database")."""
    sqlite_server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    sqlite_server.cli("import", *map(str, _files(tmp_path, 1)))
    sqlite_backup = tmp_path / "sqlite.bak"
    sqlite_server.cli("backup", "--out", str(sqlite_backup))
    pg_server = PacsServer(tmp_path / "data", Backend("pg", pg_url, None, {}))
    pg_server.cli("import", *map(str, _files(tmp_path, 1)))
    pg_backup = tmp_path / "pg.bak"
    pg_server.cli("backup", "--out", str(pg_backup))

    into_pg = pg_server.cli("restore", str(sqlite_backup), "--yes", check=False)
    assert into_pg.returncode == 1 and "pacs db copy" in into_pg.stderr and "reindex" not in into_pg.stderr, (
        into_pg.stderr)
    into_sqlite = sqlite_server.cli("restore", str(pg_backup), "--yes", check=False)
    assert into_sqlite.returncode == 1 and "PostgreSQL" in into_sqlite.stderr, into_sqlite.stderr
    assert "pacs db copy" in into_sqlite.stderr, into_sqlite.stderr
