"""PostgreSQL concurrency: deadlock victims and a write skew (the pgconc review).

1. A transaction PostgreSQL aborts as a deadlock's victim (40P01; 40001 too)
   is run again, by one helper (pacs.index.db.retry_transaction) for the
   ingest, the HIS messages, deletions and purges: an ADT^A08 losing to an
   ingest was answered AR 207 "internal error: OperationalError". One that
   loses every run is answered AR "the archive was busy" (resend it).
2. The cycle itself is avoided where the writers can agree on an order: an
   HIS update of a patient locks the patient's studies in Study Instance UID
   order before the patient row (the patients trigger locked them after it,
   in heap order), and an ingest batch writes its studies in that order.
3. A deletion of a patient's last study racing an A08 of that patient: the
   A08 waits for the study before it takes the patient (they deadlocked: the
   deletion answered HTTP 503 "storage or index unavailable"), and makes the
   patient anew when the deletion removed it (AR "NoResultFound"); a deletion
   that loses a deadlock all the same is run again.
4. `pacs purge --yes` runs a study again after losing a deadlock (it stopped
   half-way, exit 1).
5. An order (ORM^O01 NW) and the first image of its study arriving together:
   the ingest takes the order's lock before it looks for the order, so one
   of the two sees the other's row (the study stayed unreconciled).
6. An MPPS N-CREATE or N-SET (OrderService.record_step) chosen as a
   deadlock's victim is recorded again: it was answered 0110H.
7. A report's save, amendment or signature likewise (HTTP 503, and a
   signature left its unsigned PDF in the study): a signature runs its
   transaction again, not the storing of its PDF; lost every run, the PDF
   is withdrawn.
8. delete_instance_rows (a signature's PDF withdrawn, `verify --repair`)
   runs a batch again.
9. A deletion's or a purge's objects (tombstones.finish, after the rows'
   commit) losing a deadlock over their tombstones: the deletion answered
   HTTP 503 (the purge stopped) though it was done; the objects are left to
   the sweeper, reported not deleted yet. A finish locks its tombstones in
   key order, as an ingest claiming several of them does.

The races are forced, not timed: one side runs in this process on a real
PostgreSQL database and is paused inside its transaction (Paused), the other
holds row locks from a plain connection, until the database shows a backend
waiting for a lock. The plain connection never detects a deadlock itself (30
s), this process's sessions after 100 ms: the side under test is the victim.
SQLite serialises its writers (BEGIN IMMEDIATE): none of this happens there.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom.uid import generate_uid

from .peers import create_database, drop_database, wait_until
from .dicomfiles import make_ct
from .test_order_edges import Background, Paused
from .test_worklist_ris import msa, orm


@pytest.fixture(scope="module")
def core(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The archive core on a database of its own for the module (each test
    its own patients and UIDs)."""
    from pacs.app import Pacs
    from pacs.settings import load_settings

    url = create_database(postgres)
    try:
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE \"{url.rsplit('/', 1)[1]}\" SET deadlock_timeout = '100ms'")
        pacs = Pacs.open(load_settings(data_dir=tmp_path_factory.mktemp("pgconc") / "data", index_url=url))
        try:
            yield pacs
        finally:
            pacs.close()
    finally:
        drop_database(url, postgres)


# -- helpers ----------------------------------------------------------------------------------
def _dsn(core: Any) -> str:
    return str(core.settings.resolved_index_url).replace("postgresql+psycopg://", "postgresql://")


def locker(core: Any) -> psycopg.Connection[Any]:
    """A plain connection to hold row locks as another writer would; it
    leaves detecting a deadlock to the other side (see the module doc)."""
    conn = psycopg.connect(_dsn(core), autocommit=True)
    conn.execute("SET deadlock_timeout = '30s'")
    conn.autocommit = False
    return conn


def waiting(core: Any) -> int:
    """Sessions of the test database waiting for a lock (row or advisory)."""
    with psycopg.connect(_dsn(core), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0


def until(predicate: Any) -> None:
    assert wait_until(predicate, timeout=60, interval=0.02), "the other side never got there"


def hl7(core: Any, message: str) -> str:
    """The ACK of one message, handled as the MLLP server handles it."""
    from pacs.orders import OrderService
    from ris_bridge.hl7v2 import handle

    return handle(OrderService(core.engine), message.replace("\n", "\r").encode()).decode()


def a08(patient_id: str, name: str, *, control: str = "") -> str:
    """ADT^A08 of *patient_id* (issuer BVDK) from sender HIS^BVDK."""
    return "\n".join([
        f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261206083000||ADT^A08^ADT_A01|{control or generate_uid()[-20:]}|P|2.5|||||"
        "VN|UNICODE UTF-8",
        "EVN|A08|20261206083000",
        f"PID|1||{patient_id}^^^BVDK^PI||{name}||19850101|M",
        "PV1|1|O",
    ])


def store(core: Any, folder: Path, **attributes: Any) -> str:
    """Ingest one CT object (a modality's C-STORE, without the network); its study UID."""
    from pacs.ingest import Origin

    result = core.ingest_file(make_ct(folder / f"{generate_uid()}.dcm", **attributes), Origin("dimse", "CT1"))
    assert result.status == 0
    return str(result.header.study_uid)


def _one(core: Any, sql: str, *args: Any) -> Any:
    with psycopg.connect(_dsn(core)) as conn:
        return conn.execute(sql, args).fetchone()


def _rows(core: Any, sql: str, *args: Any) -> list[Any]:
    with psycopg.connect(_dsn(core)) as conn:
        return conn.execute(sql, args).fetchall()


def keys(core: Any, study_uid: str) -> tuple[int, int]:
    """(study pk, patient pk) of a stored study."""
    row = _one(core, "SELECT pk, patient_pk FROM studies WHERE study_uid = %s", study_uid)
    return int(row[0]), int(row[1])


def patient(core: Any, patient_id: str) -> tuple[str, int] | None:
    """(name, how many studies) of the patient, None when there is none."""
    row = _one(core, "SELECT p.name, (SELECT count(*) FROM studies s WHERE s.patient_pk = p.pk) FROM patients p "
                     "WHERE p.patient_id = %s", patient_id)
    return (row[0], int(row[1])) if row else None


def locked_now(conn: psycopg.Connection[Any], table: str, pk: int) -> bool:
    """Whether another transaction holds the row (FOR NO KEY UPDATE, NOWAIT)."""
    try:
        conn.execute(f"SELECT pk FROM {table} WHERE pk = %s FOR NO KEY UPDATE NOWAIT", (pk,))
        return False
    except psycopg.errors.LockNotAvailable:
        return True
    finally:
        conn.rollback()


def lose_deadlock(core: Any, pause: Paused, job: Any, held: tuple[str, Any], touch: tuple[str, Any]) -> Background:
    """Make *job* a deadlock's victim: a plain connection (:func:`locker`)
    runs *held* (SQL, parameters: a row *job* will need next), *job* runs in
    the background until *pause*, the connection then runs *touch* (a row
    *job* holds) and waits for it; released, *job* goes on to the held row:
    a cycle, which PostgreSQL breaks by aborting *job* (100 ms against 30 s).
    The job's thread, for its outcome."""
    other = locker(core)
    try:
        other.execute(*held)
        running = Background(job)
        assert pause.reached.wait(60), "the job never reached its pause"
        touched = Background(lambda: other.execute(*touch))
        until(lambda: waiting(core) == 1)
        pause.release()  # on to the row the other holds: a cycle
        touched.outcome()  # the job was the victim
        other.rollback()
        running.join(120)
    finally:
        pause.release()
        other.close()
    return running


def lose_every_race(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transactions run once (retry_transaction): the first deadlock is final,
    as when a transaction lost every one of its runs."""
    from pacs.index import db

    monkeypatch.setattr(db, "TRANSACTION_ATTEMPTS", 1)


# -- 1. an HIS update chosen as a deadlock's victim ----------------------------------------------
@pytest.mark.parametrize("runs", ["again", "once"])
def test_an_hl7_update_chosen_as_a_deadlock_victim_is_applied_again(core: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, runs: str) -> None:
    """An ADT^A08 renaming a patient holds the patient's study (the patients
    trigger) when it goes on to a row another transaction holds, while that
    one waits for the study: PostgreSQL aborts the A08, which was answered
    AR 207 "internal error: OperationalError"; it is applied again and
    answered AA. Any cycle will do (the ingest's was an instance of another
    study of the patient): here the other transaction holds the message's
    receipt (the same message arriving over a second connection). Lost on
    every run ("once": a single run allowed), it is answered AR "busy" (resend
    it), not "internal error", and nothing of it is applied."""
    pid = "PGC100" if runs == "again" else "PGC101"
    control = f"{pid}-A08"
    if runs == "once":
        lose_every_race(monkeypatch)
    assert msa(hl7(core, a08(pid, "Tran^Van Mot")))[0] == "AA"
    study_pk, _ = keys(core, store(core, tmp_path, PatientID=pid, PatientName="TRAN^VAN MOT"))
    # The A08 holds the patient and its study (paused), then needs the receipt the other holds.
    ack = lose_deadlock(
        core, Paused(monkeypatch, "_record_patient_change"),
        lambda: hl7(core, a08(pid, "Tran^Van Hai", control=control)),
        ("INSERT INTO received_messages (sender, control_id, kind, received_at) "
         "VALUES ('HIS^BVDK', %s, 'ADT^A08', now())", (control,)),
        ("UPDATE studies SET num_instances = num_instances WHERE pk = %s", (study_pk,))).outcome()
    if runs == "once":
        assert msa(ack)[0] == "AR" and "was busy" in ack and "internal error:" not in ack, ack
        assert patient(core, pid) == ("Tran^Van Mot", 1)
        return
    assert msa(ack)[0] == "AA", ack
    assert patient(core, pid) == ("Tran^Van Hai", 1)


# -- 2. the order studies are locked in ---------------------------------------------------------
def test_an_ingest_batch_writes_its_studies_in_uid_order(core: Any, tmp_path: Path) -> None:
    """Instances of two studies of one patient queue up while another batch
    commits, the later study's first: their batch counts them in Study
    Instance UID order, as an HIS update of the patient locks its studies.
    Waiting for the first study, it holds nothing of the second (it held the
    later one and waited for the earlier one, which the A08 held waiting for
    the later one: the deadlock of finding 1)."""
    pid, base = "PGC200", generate_uid()[:50]
    low, high, first = f"{base}.1", f"{base}.2", generate_uid()
    pks = {uid: keys(core, store(core, tmp_path, PatientID=pid, StudyInstanceUID=uid))[0] for uid in (low, high, first)}
    held_first, held_low, probe = locker(core), locker(core), locker(core)
    try:
        for conn, uid in ((held_first, first), (held_low, low)):
            conn.execute("SELECT pk FROM studies WHERE pk = %s FOR NO KEY UPDATE", (pks[uid],))
        leader = Background(lambda: store(core, tmp_path, PatientID=pid, StudyInstanceUID=first))
        until(lambda: waiting(core) == 1)
        later = Background(lambda: store(core, tmp_path, PatientID=pid, StudyInstanceUID=high))
        until(lambda: len(core.committer._pending) == 1)
        earlier = Background(lambda: store(core, tmp_path, PatientID=pid, StudyInstanceUID=low))
        until(lambda: len(core.committer._pending) == 2)
        held_first.rollback()  # the leader commits; the two queued make the next batch
        until(lambda: not leader.is_alive() and waiting(core) == 1)
        assert not locked_now(probe, "studies", pks[high]), "the batch holds the later study while it waits"
        held_low.rollback()
        for ingest in (leader, later, earlier):
            ingest.outcome()
    finally:
        for conn in (held_first, held_low, probe):
            conn.close()


# -- 3. deleting a patient's last study while the HIS updates the patient --------------------------
def test_an_hl7_update_waits_for_a_study_being_deleted_without_holding_its_patient(
        core: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deletion has deleted the study (locked) and is about to delete the
    patient when an A08 of the patient arrives. The A08 took the patient row
    and then waited for the study (the patients trigger), and the deletion
    waited for the patient: a deadlock (HTTP 503 or AR). It now waits for the
    study first, holding nothing the deletion wants; once the deletion
    commits it makes the patient anew and is answered AA."""
    from pacs.maintenance import delete
    from pacs.maintenance.delete import Target, delete_target

    pid = "PGC300"
    # The patient a modality made (one the HIS registered outlives its last study: pacs.index.prune).
    study_uid = store(core, tmp_path, PatientID=pid)
    patient_pk = keys(core, study_uid)[1]
    pause = Paused(monkeypatch, "prune_patients", delete, before=True)
    deletion = Background(lambda: delete_target(core, Target(study_uid), reason="sent to the wrong patient",
                                                user="tester"))
    probe = locker(core)
    try:
        assert pause.reached.wait(60)  # the study deleted, its patient next
        update = Background(lambda: hl7(core, a08(pid, "Pham^Van Moi")))
        until(lambda: waiting(core) == 1 or not update.is_alive())
        assert not locked_now(probe, "patients", patient_pk), "the A08 holds the patient the deletion deletes next"
        pause.release()
        report = deletion.outcome()
        ack = update.outcome()
    finally:
        pause.release()
        probe.close()
    assert report.removed["patients"] == 1
    assert msa(ack)[0] == "AA", ack
    assert patient(core, pid) == ("Pham^Van Moi", 0)


def test_an_hl7_update_of_a_patient_deleted_meanwhile_makes_it_anew(core: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The A08 found the patient, then waited for the deletion that removed
    it (its last study): its UPDATE changed no row and it was answered AR
    "internal error: NoResultFound". It is applied as to an unknown patient."""
    from pacs.maintenance import delete
    from pacs.maintenance.delete import Target, delete_target

    pid = "PGC310"
    study_uid = store(core, tmp_path, PatientID=pid)  # a patient only the modality made
    pause = Paused(monkeypatch, "prune_patients", delete)
    deletion = Background(lambda: delete_target(core, Target(study_uid), reason="test images", user="tester"))
    try:
        assert pause.reached.wait(60)  # the study and the patient deleted, not committed
        update = Background(lambda: hl7(core, a08(pid, "Pham^Van Sua")))
        until(lambda: waiting(core) == 1 or not update.is_alive())
        pause.release()
        report = deletion.outcome()
        ack = update.outcome()
    finally:
        pause.release()
    assert report.removed["patients"] == 1
    assert msa(ack)[0] == "AA", ack
    assert patient(core, pid) == ("Pham^Van Sua", 0)


# -- 3 and 4. a deletion or a purge chosen as a deadlock's victim ----------------------------------
@pytest.mark.parametrize("how", ["delete", "purge"])
def test_a_deletion_chosen_as_a_deadlock_victim_is_run_again(core: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Another transaction updated the patient and waits for its study (the
    patients trigger; e.g. the ingest giving a patient its first name) while
    the deletion of that study goes on to delete the patient: PostgreSQL
    aborts the deletion. `DELETE /api/studies/...` answered 503 "storage or
    index unavailable", `pacs purge --yes` stopped (exit 1); the study's
    transaction is run again."""
    from pacs.maintenance.delete import Target, delete_target
    from pacs.maintenance.purge import PurgeRules

    delete, purge = (importlib.import_module(f"pacs.maintenance.{name}") for name in ("delete", "purge"))
    pid = f"PGC4{how}"
    # Only the purge's own study is an XA of 2015 (whatever another test left).
    study_uid = store(core, tmp_path, PatientID=pid, Modality="XA" if how == "purge" else "RF", StudyDate="20150101")
    study_pk, patient_pk = keys(core, study_uid)
    if how == "delete":
        pause = Paused(monkeypatch, "prune_patients", delete, before=True)
        run: Any = lambda: delete_target(core, Target(study_uid), reason="test images", user="tester").removed["studies"]
    else:
        pause = Paused(monkeypatch, "prune_patients", purge, before=True)
        run = lambda: purge.purge(core, PurgeRules(older_than_days=30, modalities=("XA",)), execute=True,
                                  user="tester").deleted_studies
    # The deletion holds the study (paused), then needs the patient the other holds (as an UPDATE).
    deleted = lose_deadlock(core, pause, run,
                            ("SELECT pk FROM patients WHERE pk = %s FOR NO KEY UPDATE", (patient_pk,)),
                            ("UPDATE studies SET changed_at = now() WHERE pk = %s", (study_pk,))).outcome()
    assert deleted == 1
    assert patient(core, pid) is None


# -- 5. an order and the first image of its study at once -------------------------------------------
def test_an_order_and_the_first_image_of_its_study_arriving_together_are_reconciled(
        core: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingest of the study's first image looked for its order, found none
    and is making the study under the modality's temporary patient when the
    ORM^O01 NW placing that order (same Study Instance UID and accession)
    arrives. The ORM looked for stored studies, found none (not committed)
    and committed: the study stayed under the temporary patient, unlinked.
    The ORM now waits for the ingest's lock, then finds and reconciles it."""
    from pacs.index.writer import IndexWriter
    from pacs.ingest import Origin

    study_uid, accession = generate_uid(), "PGC500"
    image = make_ct(tmp_path / "first.dcm", StudyInstanceUID=study_uid, AccessionNumber=accession,
                    PatientID="TMP500", PatientName="CAP CUU^NAM")
    pause = Paused(monkeypatch, "_patient_pk", IndexWriter)  # after the order was looked for
    stored = Background(lambda: core.ingest_file(image, Origin("dimse", "CTER")))
    try:
        assert pause.reached.wait(60)
        ordered = Background(lambda: hl7(core, orm("PGC500", accession, pid="BN500", study_uid=study_uid)))
        until(lambda: waiting(core) == 1 or not ordered.is_alive())
        pause.release()
        assert stored.outcome().status == 0
        ack = ordered.outcome()
    finally:
        pause.release()
    assert msa(ack)[0] == "AA", ack
    filed = _one(core, "SELECT p.patient_id, (SELECT count(*) FROM study_orders l WHERE l.study_pk = s.pk) "
                       "FROM studies s JOIN patients p ON p.pk = s.patient_pk WHERE s.study_uid = %s", study_uid)
    assert tuple(filed) == ("BN500", 1), "the study is not filed under the order's patient and linked to it"


# -- 6. an MPPS chosen as a deadlock's victim --------------------------------------------------------
def test_an_mpps_n_set_chosen_as_a_deadlock_victim_is_recorded_again(core: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An N-SET COMPLETED holds its performed step when it goes on to the
    scheduled step (the order row) another transaction holds, while that one
    waits for the performed step: PostgreSQL aborts the N-SET, which was
    answered 0110H (processing failure) -- a final status most modalities
    never send again. The step is recorded again: COMPLETED."""
    from pacs.orders import OrderInfo, OrderService, PatientInfo

    service = OrderService(core.engine)
    accession, sop = "PGC600", generate_uid()
    service.place_steps([OrderInfo(patient=PatientInfo("PGC600", issuer="BVDK", name="Vo^Van Chup"),
                                   accession_number=accession, step_id="PGC600-1", modality="CT",
                                   station_ae_title="CT_ROOM1")])
    service.record_step(sop, status="IN PROGRESS", accession=accession, step_id="PGC600-1", modality="CT",
                        station_ae_title="CT_ROOM1", start="20261206090000", create=True)
    order_pk = _one(core, "SELECT pk FROM orders WHERE accession_number = %s", accession)[0]
    step_pk = _one(core, "SELECT pk FROM performed_steps WHERE sop_uid = %s", sop)[0]
    # The N-SET holds its performed step (paused: updated, the order next), then needs the order the
    # other holds (as an HIS change).
    procedure = lose_deadlock(
        core, Paused(monkeypatch, "_procedure_rows", before=True),
        lambda: service.record_step(sop, status="COMPLETED", end="20261206093000", create=False),
        ("SELECT pk FROM orders WHERE pk = %s FOR NO KEY UPDATE", (order_pk,)),
        ("UPDATE performed_steps SET updated_at = updated_at WHERE pk = %s", (step_pk,))).outcome()
    assert procedure["status"] == "COMPLETED"
    assert tuple(_one(core, "SELECT status FROM performed_steps WHERE pk = %s", step_pk)) == ("COMPLETED",)


# -- 7. a report signature chosen as a deadlock's victim ----------------------------------------------
@pytest.mark.parametrize("runs", ["again", "once"])
def test_a_report_signature_chosen_as_a_deadlock_victim_is_signed_again(core: Any, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        runs: str) -> None:
    """The signature stored its PDF and holds the study when it goes on to
    the draft another transaction holds, while that one waits for the study:
    PostgreSQL aborts the signature, answered HTTP 503 with the unsigned PDF
    left in the study. Its transaction is run again (not the PDF's storing:
    one PDF, the signed one). Lost on every run ("once"), the PDF is
    withdrawn and the report stays a draft."""
    from pacs.index.db import is_transient
    from pacs.reports import ReportService

    if runs == "once":
        lose_every_race(monkeypatch)
    reports = ReportService(core)
    study_uid = store(core, tmp_path, PatientID=f"PGC7{runs}")
    study_pk, _ = keys(core, study_uid)
    reports.save_draft(study_uid, "Khong thay ton thuong.", "Binh thuong.", "dr.lan", revision=0)
    report_pk = _one(core, "SELECT pk FROM reports WHERE study_pk = %s", study_pk)[0]
    # The PDF stored, the signature holds the study (paused), then needs the draft the other holds (as a save).
    signing = lose_deadlock(core, Paused(monkeypatch, "_signed", ReportService, before=True),
                            lambda: reports.sign(study_uid, "dr.lan", revision=1),
                            ("SELECT pk FROM reports WHERE pk = %s FOR NO KEY UPDATE", (report_pk,)),
                            ("UPDATE studies SET changed_at = now() WHERE pk = %s", (study_pk,)))
    pdfs = [row[0] for row in _rows(core, "SELECT i.sop_uid FROM instances i JOIN series s ON s.pk = i.series_pk "
                                          "WHERE s.study_pk = %s AND s.modality = 'DOC'", study_pk)]
    status, pdf = _one(core, "SELECT status, pdf_sop_uid FROM reports WHERE pk = %s", report_pk)
    if runs == "once":
        assert signing.error is not None and is_transient(signing.error), signing.error
        assert (status, pdf or "", pdfs) == ("draft", "", [])
        return
    assert signing.outcome()["status"] == "signed"
    assert status == "signed" and pdfs == [pdf]


# -- 8. deleting instance rows, chosen as a deadlock's victim -------------------------------------------
def test_instance_rows_deleted_as_a_deadlock_victim_are_deleted_again(core: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """delete_instance_rows (a signature's PDF withdrawn, `verify --repair`
    dropping rows of missing objects) holds the instance's series and study
    (the counters) when it goes on to delete the patient left empty, which
    another transaction holds while it waits for the study: the batch was
    aborted (HTTP 503, a repair stopped). It is deleted again."""
    from pacs.maintenance import common
    from pacs.maintenance.common import delete_instance_rows

    pid = "PGC800"
    study_pk, patient_pk = keys(core, store(core, tmp_path, PatientID=pid))
    instance_pk = _one(core, "SELECT i.pk FROM instances i JOIN series s ON s.pk = i.series_pk "
                             "WHERE s.study_pk = %s", study_pk)[0]
    # The instance deleted, its series and study held (paused), then the patient the other holds (as an UPDATE).
    removed = lose_deadlock(core, Paused(monkeypatch, "prune_after_delete", common, before=True),
                            lambda: delete_instance_rows(core.engine, [instance_pk]),
                            ("SELECT pk FROM patients WHERE pk = %s FOR NO KEY UPDATE", (patient_pk,)),
                            ("UPDATE studies SET changed_at = now() WHERE pk = %s", (study_pk,))).outcome()
    assert removed == {"instances": 1, "series": 1, "studies": 1, "patients": 1}
    assert patient(core, pid) is None


# -- 9. a deletion's objects, their tombstones' lock lost to another finish --------------------------------
@pytest.mark.parametrize("how", ["delete", "purge"])
def test_objects_whose_finish_lost_a_deadlock_are_left_to_the_sweeper(
        core: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        how: str) -> None:
    """The rows' transaction committed, the objects' (tombstones.finish)
    locked the first of the study's tombstones and then lost a deadlock to
    a transaction holding the last one (another finish, an ingest claiming
    keys): the exception reached `DELETE /api/studies/...` (HTTP 503) or
    `pacs purge --yes` (exit 1) after the deletion had happened. The
    deletion now succeeds, its objects reported not deleted yet (one
    WARNING names their keys), and the sweeper's next round deletes them.

    The cycle: the study's keys sort in the order they were stored, so the
    finish meets their tombstones in that order with or without its ORDER
    BY. A first connection holds the middle one, so the finish waits there
    holding the first; a second one holds the last and waits for the first;
    the first lets go, the finish goes on to the last."""
    from pacs.index import tombstones
    from pacs.maintenance.delete import Target, delete_target
    from pacs.maintenance.purge import PurgeRules, purge
    from pacs.sweeper import Sweeper

    pid, study_uid, series_uid = f"PGC9{how}", generate_uid(), generate_uid()
    # SOP UIDs in the order stored: the keys' order is the tombstones' (pk) order too.
    sop_base = generate_uid()[:50]
    for n in (1, 2, 3):
        store(core, tmp_path, PatientID=pid, StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
              sop_uid=f"{sop_base}.{n}", Modality="MG", StudyDate="20140101")
    stored = sorted(r[0] for r in _rows(core, "SELECT i.storage_key FROM instances i JOIN series s "
                                              "ON s.pk = i.series_pk WHERE s.series_uid = %s", series_uid))
    assert len(stored) == 3 and all(core.store.exists(k) for k in stored)
    # A purge first finishes what earlier deletions left (another test's): not the finish to pause.
    tombstones.finish_all(core.engine, core.store)
    pause = Paused(monkeypatch, "finish", tombstones, before=True)  # the rows committed, the objects next
    if how == "delete":
        run: Any = lambda: delete_target(core, Target(study_uid), reason="test images", user="tester").object_failures
    else:
        run = lambda: [f["key"] for f in purge(core, PurgeRules(older_than_days=30, modalities=("MG",)),
                                               execute=True, user="tester").object_failures.items]
    middle, last = locker(core), locker(core)
    try:
        with caplog.at_level(logging.WARNING, logger="pacs.index.tombstones"):
            running = Background(run)
            assert pause.reached.wait(60), "the deletion never reached its objects"
            pks = [r[0] for r in _rows(core, "SELECT pk FROM deleting_objects WHERE storage_key = ANY(%s) "
                                             "AND finished_at IS NULL ORDER BY storage_key, pk", stored)]
            assert len(pks) == 3
            middle.execute("SELECT pk FROM deleting_objects WHERE pk = %s FOR UPDATE", (pks[1],))
            last.execute("SELECT pk FROM deleting_objects WHERE pk = %s FOR UPDATE", (pks[2],))
            pause.release()
            until(lambda: waiting(core) == 1)  # the finish holds the first, waits for the middle
            first = Background(lambda: last.execute("SELECT pk FROM deleting_objects WHERE pk = %s FOR UPDATE",
                                                    (pks[0],)))
            until(lambda: waiting(core) == 2)
            middle.rollback()  # the finish goes on to the last: a cycle, the finish its victim
            first.outcome()
            last.rollback()
            left = running.outcome()
    finally:
        pause.release()
        middle.close()
        last.close()
    assert sorted(left) == stored
    assert _rows(core, "SELECT pk FROM studies WHERE study_uid = %s", study_uid) == []
    warned = [r.getMessage() for r in caplog.records if "left to the sweeper" in r.getMessage()]
    assert len(warned) == 1 and all(k in warned[0] for k in stored), warned
    assert all(core.store.exists(k) for k in stored)  # the finish deleted nothing before it lost
    Sweeper(core).sweep()
    assert not any(core.store.exists(k) for k in stored)
    assert {r[0] for r in _rows(core, "SELECT outcome FROM deleting_objects WHERE storage_key = ANY(%s)",
                                stored)} == {"deleted"}


def test_a_finish_locks_its_tombstones_in_key_order(core: Any) -> None:
    """Two finishes of the same keys (two deletions, a deletion and the
    sweeper) or a finish and an ingest claiming several of them locked the
    tombstones in the order their scans met them, and could deadlock; they
    lock them in key order: waiting for the first key's, a finish holds
    none of a later key (here recorded first, so a scan meets it first)."""
    from pacs.index import tombstones
    from pacs.index.db import write_transaction

    folder = f"{generate_uid()}/{generate_uid()}"
    wanted = [f"{folder}/{n}.dcm" for n in (1, 2, 3)]
    with write_transaction(core.engine) as conn:
        tombstones.record(conn, reversed(wanted), "delete-order")
    pks = {r[1]: r[0] for r in _rows(core, "SELECT pk, storage_key FROM deleting_objects "
                                           "WHERE storage_key = ANY(%s)", wanted)}
    holder, probe = locker(core), locker(core)
    try:
        holder.execute("SELECT pk FROM deleting_objects WHERE pk = %s FOR UPDATE", (pks[wanted[0]],))
        finishing = Background(lambda: tombstones.finish(core.engine, core.store, list(reversed(wanted))))
        until(lambda: waiting(core) == 1)
        assert not locked_now(probe, "deleting_objects", pks[wanted[2]]), "the finish holds a later key's tombstone"
        holder.rollback()
        assert sorted(finishing.outcome().deleted) == wanted
    finally:
        holder.close()
        probe.close()
