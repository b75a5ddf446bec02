"""Fresh-eyes review of the reading worklist (priority, claims): each test a bug found.

- An HL7 order "as needed" (PRN, table 0027) was read by its first letter
  as P (pre-op, HIGH): listed first and counted as urgent.
- PostgreSQL: the viewer's heartbeat racing the report's signature (the
  signer's own open viewer) read the report state before the signature
  committed, then found the claim the signature deleted gone and inserted a
  new one: a signed study shown as being read, audited as a new claim.
- A radiologist disabled (or made a referring physician) kept their claims:
  colleagues saw the studies as being read by someone who no longer can.
- "Take over", pressed on a banner naming A once the study had passed to C,
  took it from C, whom the taker never saw: the take-over names its holder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text, update

from pacs.auth import AuthService
from pacs.index import create_index_engine, upgrade_schema
from pacs.index.models import ReadingClaim, Study
from pacs.index.writer import IndexWriter
from pacs.reading_claims import ClaimError, claim, claim_of, end_on_signature
from ris_bridge.hl7v2 import orders_from, parse

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import create_database, drop_database
from .test_name_words import _receive
from .test_reading_worklist import _orm

STUDY = "1.2.826.0.1.3680043.9.7.1"


@pytest.mark.parametrize(("code", "term"), [
    ("PRN", "LOW"), ("prn ", "LOW"), ("S", "STAT"), ("STAT", "STAT"), ("A", "HIGH"), ("P", "HIGH"),
    ("R", "ROUTINE"), ("TS30", "MEDIUM"), ("HIGH", "HIGH"), ("LOW", "LOW"), ("MEDIUM", "MEDIUM"), ("", ""),
])
def test_hl7_priority_codes(code: str, term: str) -> None:
    """OBR-27.6 as HIS send it: PRN is not urgent; DICOM's own words are read as such."""
    message = _orm("MSG1", "ACC1", "BN1", "", code).replace("\n", "\r")
    orders = orders_from(parse(message.encode())[0])
    assert [info.priority for _, info in orders] == [term]


@pytest.fixture
def pg_index(tmp_path: Path) -> Iterator[Engine]:
    """A PostgreSQL index holding one unreported CT study (STUDY)."""
    url = create_database()
    engine = create_index_engine(url)
    try:
        upgrade_schema(engine)
        _receive(engine, IndexWriter(), tmp_path, "BN1", "Nguyễn^Văn An", 1)
        yield engine
    finally:
        engine.dispose()
        drop_database(url)


def test_a_heartbeat_racing_the_signature_does_not_claim_the_signed_study(pg_index: Engine) -> None:
    """The signature's transaction (report state signed, claim ended) still
    open while the holder's viewer beats: the beat waits for it and is refused."""
    claim(pg_index, STUDY, "bs.an", "BS. An", 20)
    outcome: list[object] = []

    def heartbeat() -> None:
        try:
            outcome.append(claim(pg_index, STUDY, "bs.an", "BS. An", 20).action)
        except ClaimError as exc:
            outcome.append(exc.http_status)

    with pg_index.connect() as signing:
        with signing.begin():
            # What ReportService.sign does to these tables (the reports trigger sets the state).
            pk = signing.execute(select(Study.pk).where(Study.study_uid == STUDY)).scalar_one()
            signing.execute(update(Study).where(Study.pk == pk).values(report_state="signed"))
            end_on_signature(signing, pk)
            beat = threading.Thread(target=heartbeat)
            beat.start()
            with pg_index.connect() as watch:
                for _ in range(200):  # until the beat waits on a lock (or ended)
                    waiting = watch.execute(text("SELECT count(*) FROM pg_stat_activity "
                                                 "WHERE wait_event_type = 'Lock'")).scalar_one()
                    if waiting or not beat.is_alive():
                        break
                    time.sleep(0.05)
        beat.join(30)
    assert outcome == [409]
    with pg_index.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ReadingClaim)).scalar_one() == 0


def test_disabling_a_radiologist_ends_their_claims(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path}/index.sqlite")
    try:
        upgrade_schema(engine)
        _receive(engine, IndexWriter(), tmp_path, "BN1", "Nguyễn^Văn An", 1)
        auth = AuthService(engine)
        auth.add_user("bs.an", "radiologist", "mat-khau-dai", "BS. An")
        claim(engine, STUDY, "bs.an", "BS. An", 20)
        assert claim_of(engine, STUDY) is not None
        assert auth.disable_user("bs.an")
        assert claim_of(engine, STUDY) is None
        # A colleague claims it without a take-over.
        assert claim(engine, STUDY, "bs.binh", "BS. Bình", 20).action == "claim"
        # Likewise a radiologist made a referring physician; an update keeping the role keeps the claim.
        auth.add_user("bs.binh", "radiologist", "mat-khau-moi", "BS. Bình")
        assert claim_of(engine, STUDY) is not None
        auth.add_user("bs.binh", "referring", "mat-khau-moi", "BS. Bình")
        assert claim_of(engine, STUDY) is None
    finally:
        engine.dispose()


def test_a_take_over_takes_only_the_claim_the_taker_was_shown(tmp_path: Path) -> None:
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    server.start()
    try:
        ct = make_ct(tmp_path / "ct.dcm", PatientID="BN1", StudyInstanceUID=STUDY)
        assert server.storescu(str(ct)).returncode == 0
        tokens = {user: server.make_token(user, "radiologist", user.upper()) for user in ("bs.an", "bs.binh", "bs.chi")}
        path = f"/api/studies/{STUDY}/claim"
        with server.http(token=tokens["bs.an"]) as an, server.http(token=tokens["bs.binh"]) as binh, \
                server.http(token=tokens["bs.chi"]) as chi:
            assert an.post(path).status_code == 200
            shown = binh.post(path)  # B's viewer: "BS.AN is reading", with "take over"
            assert shown.status_code == 409 and shown.json()["claim"]["user"] == "bs.an"
            assert chi.post(path, json={"take_over": True, "holder": "bs.an"}).status_code == 200
            # B presses the button still naming A: refused, naming C.
            refused = binh.post(path, json={"take_over": True, "holder": "bs.an"})
            assert refused.status_code == 409 and refused.json()["claim"]["user"] == "bs.chi"
            assert chi.post(path).json()["mine"]  # C's heartbeat: still C's
            # Shown C now: B takes it over from C.
            taken = binh.post(path, json={"take_over": True, "holder": "bs.chi"})
            assert taken.status_code == 200 and taken.json()["mine"]
            # A take-over naming nobody (an older client) takes whoever's.
            assert an.post(path, json={"take_over": True}).status_code == 200
    finally:
        server.stop()


def test_a_heartbeat_does_not_take_back_a_released_or_taken_claim(tmp_path: Path) -> None:
    """The viewer's heartbeat claimed anew whenever it found no claim of its
    user: an administrator's release, or a take-over followed by a release,
    was undone by the first viewer's next beat, unasked (audited as a new
    claim). A heartbeat now only extends a claim its user still holds."""
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    server.start()
    try:
        ct = make_ct(tmp_path / "ct.dcm", PatientID="BN1", StudyInstanceUID=STUDY)
        assert server.storescu(str(ct)).returncode == 0
        an = server.make_token("bs.an", "radiologist", "BS. An")
        binh = server.make_token("bs.binh", "radiologist", "BS. Bình")
        admin = server.make_token("quantri", "admin", "Quản trị")
        path = f"/api/studies/{STUDY}/claim"
        beat = {"take_over": False, "refresh": True}
        with server.http(token=an) as viewer_a, server.http(token=binh) as viewer_b, \
                server.http(token=admin) as administrator:
            assert viewer_a.post(path).status_code == 200
            assert viewer_a.post(path, json=beat).json()["mine"]  # a beat extends one's own claim
            assert administrator.delete(path).status_code == 204
            ended = viewer_a.post(path, json=beat)
            assert ended.status_code == 409 and ended.json().get("claim") is None, ended.text
            assert viewer_b.post(path).status_code == 200  # free: a colleague claims it
            # B took it; B releases at once: A's next beat must not take it back.
            assert viewer_b.delete(path).status_code == 204
            assert viewer_a.post(path, json=beat).status_code == 409
            with server.http(token=binh) as check:
                assert check.post(path).json()["mine"]
            # A colleague's running claim: the beat is told who reads it.
            taken = viewer_a.post(path, json=beat)
            assert taken.status_code == 409 and taken.json()["claim"]["user"] == "bs.binh"
    finally:
        server.stop()
