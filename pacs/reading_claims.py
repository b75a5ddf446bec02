"""Reading claims: which radiologist is reading a study ("đang đọc").

A radiologist who opens a study to report it (or presses "Nhận đọc /
Claim") claims it; colleagues' worklists show who reads it, and a colleague
who opens it is warned and may take it over, explicitly. A claim ends when
the report is signed (:func:`end_on_signature`, in the signature's
transaction), when its holder releases it, or ``reading_claim_minutes``
after the viewer last refreshed it (the viewer does while the study stays
open). Claims are rows of the index (``reading_claims``, one per study),
judged on the database's clock (:func:`pacs.index.db.db_now`), so every
node of a cluster sees the same holder and the same expiry.

The claim is advice between colleagues, not a lock: a draft's revision
check (pacs.reports) still decides between two saves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update

from .index.db import db_now, write_transaction
from .index.models import ReadingClaim, Study
from .index.writer_helpers import insert_ignore

claims_t = ReadingClaim.__table__
studies_t = Study.__table__

# Report states (studies.report_state) with nothing left to read: a claim is refused.
_DONE = ("signed",)


class ClaimError(Exception):
    """A claim refused, with the HTTP status a client gets (404 no study,
    409 held by a colleague or nothing to read, 403 not the holder's to
    release) and, for 409, the claim that holds it."""

    def __init__(self, message: str, http_status: int, holder: Claim | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.holder = holder


@dataclass(frozen=True)
class Claim:
    """One radiologist's claim on a study."""

    username: str
    display_name: str
    claimed_at: datetime
    expires_at: datetime

    def as_json(self, viewer: str = "") -> dict[str, Any]:
        """The claim as the API gives it (*viewer*: who asks, for ``mine``)."""
        return {"user": self.username, "display_name": self.display_name,
                "since": self.claimed_at.isoformat(), "expires_at": self.expires_at.isoformat(),
                "mine": bool(viewer) and viewer == self.username}


@dataclass(frozen=True)
class ClaimOutcome:
    """What :func:`claim` did: ``claim`` (a new claim), ``refresh`` (the
    holder's own, extended), ``take-over`` (a colleague's replaced:
    *previous*)."""

    claim: Claim
    action: str
    previous: Claim | None = None


def _claim(row: Any) -> Claim:
    return Claim(row.username, row.display_name, row.claimed_at, row.expires_at)


def _study(conn: Connection, study_uid: str, *, locked: bool = False) -> Any:
    """The study's pk and report state; *locked*: under a share lock
    (PostgreSQL) until the transaction ends, so a signature committing
    meanwhile is waited for and seen (see :func:`claim`)."""
    stmt = select(studies_t.c.pk, studies_t.c.report_state).where(studies_t.c.study_uid == study_uid)
    row = conn.execute(stmt.with_for_update(read=True) if locked else stmt).first()
    if row is None:
        raise ClaimError(f"no study {study_uid}", 404)
    return row


def _held(conn: Connection, study_pk: int) -> Any:
    """The claim row of a study, locked (PostgreSQL) for the transaction."""
    return conn.execute(select(claims_t).where(claims_t.c.study_pk == study_pk).with_for_update()).first()


def claim(engine: Engine, study_uid: str, username: str, display_name: str, minutes: float, *,
          take_over: bool = False, holder: str = "", refresh: bool = False) -> ClaimOutcome:
    """Claim *study_uid* for *username* for *minutes*, or extend their claim
    (the viewer's heartbeat). A colleague's claim still running is a 409
    (ClaimError with its holder) unless *take_over*; with *holder* (the user
    name the taker was shown) only that colleague's claim is taken over, a
    claim passed to another meanwhile is a 409 naming them. A study whose
    report is signed has nothing to read: 409. *refresh* (the viewer's
    heartbeat) only extends a claim this user still holds: one released (by
    an administrator) or taken over since is a 409, never claimed anew."""
    with write_transaction(engine) as conn:
        # Locked: the signature's transaction updates the study's report state
        # before it ends the claim. Unlocked, a heartbeat of the signer's viewer
        # read "draft", waited for the claim row, found it deleted and claimed
        # the signed study anew.
        study = _study(conn, study_uid, locked=True)
        if study.report_state in _DONE:
            raise ClaimError("the report is signed: there is nothing to read (amend it first)", 409)
        now = db_now(conn)
        expires = now + timedelta(minutes=minutes)
        # Claims long expired go, so the table holds about the studies being read.
        conn.execute(delete(claims_t).where(claims_t.c.expires_at < now - timedelta(days=1)))
        row = _held(conn, study.pk)
        if refresh and (row is None or row.username != username):
            # A heartbeat claiming anew undid an administrator's release, or a take-over released at once:
            # the first viewer's next beat took the study back, unasked.
            held_by = _claim(row) if row is not None else None
            if held_by is not None and held_by.expires_at <= now:
                held_by = None
            raise ClaimError("your claim on this study has ended (released or taken over)", 409, held_by)
        if row is None:
            values = {"study_pk": study.pk, "username": username, "display_name": display_name,
                      "claimed_at": now, "expires_at": expires}
            if insert_ignore(conn, claims_t, values, ["study_pk"]) is not None:
                return ClaimOutcome(Claim(username, display_name, now, expires), "claim")
            row = _held(conn, study.pk)  # a colleague's claim committed meanwhile: judged as any other
        held = _claim(row)
        running = held.expires_at > now
        if running and held.username == username:
            conn.execute(update(claims_t).where(claims_t.c.study_pk == study.pk)
                         .values(expires_at=expires, display_name=display_name))
            return ClaimOutcome(Claim(username, display_name, held.claimed_at, expires), "refresh")
        # A take-over replaces the claim the taker saw: the banner's "take over" pressed once the
        # study had passed to a third colleague took it from someone the taker never saw.
        if running and (not take_over or (holder and holder != held.username)):
            raise ClaimError(f"{held.display_name or held.username} is reading this study", 409, held)
        conn.execute(update(claims_t).where(claims_t.c.study_pk == study.pk)
                     .values(username=username, display_name=display_name, claimed_at=now, expires_at=expires))
        return ClaimOutcome(Claim(username, display_name, now, expires),
                            "take-over" if running else "claim", held if running else None)


def release(engine: Engine, study_uid: str, username: str, *, anyone: bool = False) -> Claim | None:
    """End *username*'s claim on *study_uid* (*anyone*: whoever holds it,
    an administrator's release); the claim ended, or None when there was
    none running. A colleague's running claim is a 403."""
    with write_transaction(engine) as conn:
        study = _study(conn, study_uid)
        row = _held(conn, study.pk)
        if row is None:
            return None
        held = _claim(row)
        running = held.expires_at > db_now(conn)
        if running and held.username != username and not anyone:
            raise ClaimError(f"{held.display_name or held.username} is reading this study, not you", 403, held)
        conn.execute(delete(claims_t).where(claims_t.c.study_pk == study.pk))
        return held if running else None


def end_on_signature(conn: Connection, study_pk: int) -> None:
    """In a report signature's transaction: the study's claim ends."""
    conn.execute(delete(claims_t).where(claims_t.c.study_pk == study_pk))


def current(conn: Connection, study_pks: Iterable[int], now: datetime) -> dict[int, Claim]:
    """The running claims of *study_pks* (a worklist page: one query)."""
    pks = list(study_pks)
    if not pks:
        return {}
    rows = conn.execute(select(claims_t).where(claims_t.c.study_pk.in_(pks), claims_t.c.expires_at > now))
    return {row.study_pk: _claim(row) for row in rows}


def claim_of(engine: Engine, study_uid: str) -> Claim | None:
    """The running claim on a study, if any."""
    with engine.connect() as conn:
        pk = conn.execute(select(studies_t.c.pk).where(studies_t.c.study_uid == study_uid)).scalar()
        return current(conn, [pk], db_now(conn)).get(pk) if pk is not None else None
