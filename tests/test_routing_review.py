"""Reviewer findings on routing, each against real peers: a running `pacs serve`,
DCMTK storescp as C-STORE destinations (one accepting every syntax, one only
uncompressed ones) and a second `pacs serve` as STOW-RS target.

One server per module: each test owns its rules (matched on its own calling
AE) so the tests do not see each other's jobs."""

from __future__ import annotations

import json
import sqlite3
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from .conftest import Backend, PacsServer, pydicom_file
from .dicomfiles import make_ct
from .peers import wait_until
from .test_routing import Receiver

VIETNAMESE = "Bệnh viện Đa khoa Tỉnh"


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("routing-review")
    every = Receiver(tmp / "every").start()  # +xa: every syntax
    plain = Receiver(tmp / "plain", accept_all=False).start()  # uncompressed syntaxes only
    reader = PacsServer(tmp / "reader", Backend("sqlite-fs", None, None, {})).start()
    # Rules read per object (no 2 s cache): a rule changed in the index applies to the next store.
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_ROUTE_MAX_ATTEMPTS": "3", "PACS_ROUTE_RULES_REFRESH_SECONDS": "0"})
    server.cli("ae", "add", "EVERY", "--host", "127.0.0.1", "--port", str(every.port))
    server.cli("ae", "add", "PLAIN", "--host", "127.0.0.1", "--port", str(plain.port))
    server.start()
    try:
        yield {"tmp": tmp, "every": every, "plain": plain, "reader": reader, "server": server}
    finally:
        server.stop()
        reader.stop()
        every.stop()
        plain.stop()


def _jobs(server: PacsServer, rule: str) -> list[dict]:
    jobs = json.loads(server.cli("route", "list", "--json", "--limit", "100000").stdout)["jobs"]
    return [j for j in jobs if j["rule"] == rule]


def _states(server: PacsServer, rule: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in _jobs(server, rule):
        counts[job["state"]] = counts.get(job["state"], 0) + 1
    return counts


def _store(server: PacsServer, path: Path, calling: str, *flags: str) -> str:
    result = server.storescu(*flags, str(path), calling=calling)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _received(receiver: Receiver, uids: set[str], timeout: float = 60) -> dict[str, Path]:
    wait_until(lambda: uids <= set(receiver.files()), timeout=timeout)
    files = receiver.files()
    assert uids <= set(files), (uids, set(files))
    return {uid: files[uid] for uid in uids}


# -- 1. STOW-RS batch with an object missing from the store ---------------------------------
def test_a_stow_batch_with_a_missing_object_delivers_the_rest(peers: dict) -> None:
    server, reader, tmp = peers["server"], peers["reader"], peers["tmp"]
    server.cli("route", "add", "stow-missing", "--if", "CallingAE=STOW_MISS",
               "--to-url", f"http://127.0.0.1:{reader.http_port}/dicom-web", "--auth", f"Bearer {reader.token}",
               "--stable", "6")
    study = generate_uid()
    uids = [_store(server, make_ct(tmp / f"miss-{i}.dcm", StudyInstanceUID=study), "STOW_MISS") for i in range(3)]
    # The second object's file goes before the study is stable (a disk
    # error, a hand-deleted file): its part cannot be made.
    core = server.core()
    try:
        from pacs.query import Level
        from pacs.retrieve import resolve

        (item,) = resolve(core, Level.IMAGE, {"SOPInstanceUID": uids[1]})
        core.store.delete(item.storage_key)
    finally:
        core.close()
    assert wait_until(lambda: _states(server, "stow-missing") == {"done": 2, "dead": 1}, timeout=60), \
        _jobs(server, "stow-missing")
    dead = [j for j in _jobs(server, "stow-missing") if j["state"] == "dead"]
    assert dead[0]["sop_uid"] == uids[1] and "missing" in dead[0]["last_error"], dead
    with reader.http() as client:
        found = client.get("/dicom-web/instances", params={"StudyInstanceUID": study}).json()
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted([uids[0], uids[2]])


def test_cancel_takes_jobs_stuck_in_sending_once_their_lease_expired(tmp_path: Path) -> None:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("route", "add", "stuck", "--if", "Modality=CT", "--to-url", "http://127.0.0.1:9/dicom-web")
    from sqlalchemy import insert, select

    from pacs.routing import jobs_t, rules_t

    now = datetime.now(UTC)
    core = server.core()
    try:
        with core.engine.begin() as conn:
            rule_pk = conn.execute(select(rules_t.c.pk).where(rules_t.c.name == "stuck")).scalar_one()
            # Claimed by a sender that is gone: one lease expired a minute
            # ago, one still running (its sender renews it).
            for sop, due in (("1.2.3.1", now - timedelta(minutes=1)), ("1.2.3.2", now + timedelta(minutes=4))):
                conn.execute(insert(jobs_t).values(
                    rule_pk=rule_pk, sop_uid=sop, study_uid="1.2.3", state="sending", attempts=1,
                    destination_key="dicomweb:http://127.0.0.1:9/dicom-web", next_attempt_at=due,
                    claimed_by="gone", last_error="", created_at=now, updated_at=now))
    finally:
        core.close()
    result = json.loads(server.cli("route", "cancel", "--rule", "stuck", "--json").stdout)
    # The expired claim (its sender is gone) is cancelled; a live one is not.
    assert result == {"cancelled": 1}
    states = {j["sop_uid"]: j["state"] for j in _jobs(server, "stuck")}
    assert states == {"1.2.3.1": "cancelled", "1.2.3.2": "sending"}


# -- 2. --set with text the source's character set cannot hold ------------------------------
def test_set_values_arrive_exactly_whatever_the_source_character_set(peers: dict) -> None:
    server, every, tmp = peers["server"], peers["every"], peers["tmp"]
    server.cli("route", "add", "morph-vn", "--if", "CallingAE=MORPH_VN", "--to-ae", "EVERY",
               "--set", f"InstitutionName={VIETNAMESE}")
    latin1 = _store(server, make_ct(tmp / "latin1.dcm", SpecificCharacterSet="ISO_IR 100",
                                    PatientName="Müller^Jürgen"), "MORPH_VN")
    ascii_only = _store(server, make_ct(tmp / "ascii.dcm", PatientName="NGUYEN^AN"), "MORPH_VN")  # no charset
    files = _received(every, {latin1, ascii_only})
    for uid, path in files.items():
        ds = dcmread(path)
        assert ds.InstitutionName == VIETNAMESE, (uid, ds.get("SpecificCharacterSet"), ds.InstitutionName)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
    # The other text of the object is kept as it was (re-encoded, not mangled).
    assert str(dcmread(files[latin1]).PatientName) == "Müller^Jürgen"


# -- 3. --set values that do not fit their VR --------------------------------------------------
def test_set_values_are_checked_against_their_vr(peers: dict) -> None:
    server, every, tmp = peers["server"], peers["every"], peers["tmp"]
    for bad in ("Rows=abc", "Rows=70000", "StudyDate=yesterday", "PatientAge=abc", "PixelData=x"):
        result = server.cli("route", "add", "bad-morph", "--if", "CallingAE=BAD_MORPH", "--to-ae", "EVERY",
                            "--set", bad, check=False)
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert bad.split("=")[0] in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "bad-morph" not in server.cli("route", "rules", "--json").stdout
    # Numbers for binary VRs are numbers on the copy.
    server.cli("route", "add", "good-morph", "--if", "CallingAE=GOOD_MORPH", "--to-ae", "EVERY",
               "--set", "SmallestImagePixelValue=3", "--set", "SliceThickness=2.5")
    uid = _store(server, make_ct(tmp / "good-morph.dcm"), "GOOD_MORPH")
    ds = dcmread(_received(every, {uid})[uid])
    assert ds.SmallestImagePixelValue == 3 and float(ds.SliceThickness) == 2.5
    # A bad value already in the index (a rule from before the check): the
    # job fails for good as "cannot prepare", not as the destination's failure.
    server.cli("route", "add", "old-morph", "--if", "CallingAE=OLD_MORPH", "--to-ae", "EVERY")
    db = sqlite3.connect(server.data_dir / "index.sqlite", timeout=30)
    try:
        db.execute("UPDATE routing_rules SET morph = ? WHERE name = 'old-morph'", (json.dumps({"Rows": "abc"}),))
        db.commit()
    finally:
        db.close()
    _store(server, make_ct(tmp / "old-morph.dcm"), "OLD_MORPH")
    assert wait_until(lambda: _states(server, "old-morph").get("dead") == 1, timeout=30), _jobs(server, "old-morph")
    (job,) = _jobs(server, "old-morph")
    assert job["attempts"] == 1 and job["last_error"].startswith("cannot prepare"), job
    assert "Rows" in job["last_error"]


# -- 4. compressed objects to a destination taking only uncompressed ones ---------------------
def test_compressed_objects_reach_an_uncompressed_only_destination(peers: dict) -> None:
    server, plain, tmp = peers["server"], peers["plain"], peers["tmp"]
    server.cli("route", "add", "to-plain", "--if", "CallingAE=RLE_SRC", "--to-ae", "PLAIN")
    server.cli("route", "add", "j2k-to-plain", "--if", "CallingAE=J2K_SRC", "--to-ae", "PLAIN",
               "--transcode", "j2k-lossless")
    original = pydicom_file("MR_small_RLE.dcm")
    rle = _store(server, original, "RLE_SRC", "-xr")
    # A rule compressing on the way, to a destination that cannot take it.
    ct = make_ct(tmp / "to-j2k.dcm", Rows=64, Columns=64,
                 PixelData=(np.arange(4096, dtype=np.uint16) * 7).tobytes())
    j2k = _store(server, ct, "J2K_SRC")
    # An RLE object whose pixel data cannot be decoded.
    broken = make_ct(tmp / "broken-rle.dcm")
    ds = dcmread(broken)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x00\x01\x02\x03 not RLE at all" * 4])
    ds["PixelData"].VR = "OB"
    ds.save_as(broken, enforce_file_format=True)
    bad = _store(server, broken, "RLE_SRC", "-xr")
    files = _received(plain, {rle, j2k})
    received = dcmread(files[rle])
    assert received.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(received.pixel_array, dcmread(original).pixel_array)
    received = dcmread(files[j2k])
    assert received.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(received.pixel_array, dcmread(ct).pixel_array)
    assert wait_until(lambda: _states(server, "to-plain") == {"done": 1, "dead": 1}, timeout=30), \
        _jobs(server, "to-plain")
    (dead,) = [j for j in _jobs(server, "to-plain") if j["state"] == "dead"]
    assert dead["sop_uid"] == bad and dead["attempts"] == 1 and "RLE Lossless" in dead["last_error"], dead
    assert bad not in plain.files()


# -- 5. removing a rule with unfinished jobs ------------------------------------------------------
def test_remove_refuses_to_drop_unfinished_jobs_without_force(peers: dict) -> None:
    server, tmp = peers["server"], peers["tmp"]
    server.cli("route", "add", "to-unknown", "--if", "CallingAE=TO_UNKNOWN", "--to-ae", "NOT_REGISTERED")
    for i in range(2):
        _store(server, make_ct(tmp / f"unknown-{i}.dcm"), "TO_UNKNOWN")
    assert wait_until(lambda: all(j["attempts"] >= 1 for j in _jobs(server, "to-unknown"))
                      and len(_jobs(server, "to-unknown")) == 2, timeout=30)
    result = server.cli("route", "remove", "to-unknown", check=False)
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "2" in message and "--force" in message, message
    assert len(_jobs(server, "to-unknown")) == 2
    assert "to-unknown" in server.cli("route", "rules", "--json").stdout
    result = json.loads(server.cli("route", "remove", "to-unknown", "--force", "--json").stdout)
    assert result == {"removed": "to-unknown", "discarded": 2}
    assert "to-unknown" not in server.cli("route", "rules", "--json").stdout
    # A rule without unfinished jobs goes without --force; an unknown one is an error.
    server.cli("route", "add", "idle", "--if", "CallingAE=NOBODY", "--to-ae", "EVERY")
    assert json.loads(server.cli("route", "remove", "idle", "--json").stdout) == {"removed": "idle", "discarded": 0}
    assert server.cli("route", "remove", "idle", check=False).returncode == 1


# -- 6. export of a study named twice -------------------------------------------------------------
def test_export_of_a_study_named_twice_writes_each_object_once(peers: dict) -> None:
    server, tmp = peers["server"], peers["tmp"]
    study = generate_uid()
    for i in range(2):
        _store(server, make_ct(tmp / f"export-{i}.dcm", StudyInstanceUID=study), "EXPORTER")
    out = tmp / "twice.zip"
    server.cli("export", study, study, "--out", str(out))
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    assert len(names) == len(set(names)) == 2, names


# -- 7. a removed rule's primary key given to another rule (SQLite) ----------------------------
def test_a_job_planned_with_a_removed_rule_is_not_created(tmp_path: Path) -> None:
    """Ingest plans with rules cached for 2 s: a rule removed meanwhile, its
    primary key given by SQLite to the next rule added, must not have its
    jobs sent under the new rule (without de-identification)."""
    from sqlalchemy import select

    from pacs.index.db import write_transaction
    from pacs.routing import RoutingRules, create_jobs, jobs_t, parse_condition

    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("route", "add", "deid", "--if", "Modality=CT", "--to-url", "http://127.0.0.1:9/research",
               "--deidentify")
    core = server.core()
    try:
        ingest_rules = RoutingRules(core.engine)  # a DICOM worker's cache
        planned = ingest_rules.plan(None, "CT1", "1.2.840.10008.5.1.4.1.1.2", "CT")
        assert len(planned) == 1
        operator = RoutingRules(core.engine)
        operator.remove("deid", force=True)
        taken = operator.add("plain", [parse_condition("Modality=MR")], "dicomweb", "http://127.0.0.1:9/other")
        assert taken.pk == planned[0].rule_pk  # SQLite hands the key out again
        stale = ingest_rules.plan(None, "CT1", "1.2.840.10008.5.1.4.1.1.2", "CT")  # within the 2 s
        assert stale == planned
        with write_transaction(core.engine) as conn:
            create_jobs(conn, stale, "1.2.3.4", "1.2.3", datetime.now(UTC))
        with core.engine.connect() as conn:
            assert conn.execute(select(jobs_t)).all() == []
    finally:
        core.close()


def test_a_job_planned_with_a_removed_rule_does_not_fail_the_ingest_on_postgresql(tmp_path: Path,
                                                                                  pg_url: str) -> None:
    """The same on PostgreSQL (keys are not reused there): the job's insert
    broke the foreign key and with it the whole index transaction of the
    instance (the modality's C-STORE)."""
    from sqlalchemy import select

    from pacs.index.db import write_transaction
    from pacs.routing import RoutingRules, create_jobs, jobs_t

    server = PacsServer(tmp_path / "data", Backend("pg", pg_url, None, {}))
    server.cli("route", "add", "gone", "--if", "Modality=CT", "--to-url", "http://127.0.0.1:9/x")
    server.cli("route", "add", "kept", "--if", "Modality=CT", "--to-url", "http://127.0.0.1:9/y")
    core = server.core()
    try:
        ingest_rules = RoutingRules(core.engine)
        planned = ingest_rules.plan(None, "CT1", "1.2.840.10008.5.1.4.1.1.2", "CT")
        assert len(planned) == 2
        assert RoutingRules(core.engine).remove("gone") == 0
        with write_transaction(core.engine) as conn:
            create_jobs(conn, ingest_rules.plan(None, "CT1", "1.2.840.10008.5.1.4.1.1.2", "CT"), "1.2.3.4", "1.2.3",
                        datetime.now(UTC))
        with core.engine.connect() as conn:
            rules = [r.rule_pk for r in conn.execute(select(jobs_t.c.rule_pk)).all()]
        assert rules == [next(r.rule_pk for r in planned if r.rule_name == "kept")]
    finally:
        core.close()
