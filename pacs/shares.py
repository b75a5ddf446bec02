"""Patient share links: one study shown to its patient without an account.

A hospital going filmless prints a QR code on the patient's receipt instead
of handing out film; scanned, it opens ``/share/{token}``: the study's
images and its signed report, on a phone (viewer_api.share_page). The HIS
asks for the link (``POST /api/studies/{uid}/shares``), an operator with
``pacs share create``.

- A link names a study, or an order (``POST /api/orders/{accession}/shares``,
  ``pacs share create --accession``): the receipt is printed when the
  patient registers and pays, before the scan, when only the order exists.
  An order link shows the studies reconciliation links to that order, when
  they come ("not ready yet" before), and never another
  (:mod:`pacs.share_orders`); its birth year is the order's patient's; an
  order the HIS withdrew (cancelled) before any image answers 410 (one
  withdrawn after its images still shows them).

- The token is 192 random bits, URL-safe (32 characters: a small QR code).
  Only its SHA-256 is kept: a copy of the database opens no link, and the
  token is shown once, when the link is made.
- A link lasts ``share_days`` (30) unless its creator says otherwise, at
  most ``share_days_max`` (365); it can be revoked at any time. An expired
  or revoked link answers 410, an unknown one 404. A link goes with its
  study (a study deleted as sent in error shows nothing more).
- Second factor (``share_birth_year``, on by default): when the index has
  the patient's birth date, the page first asks the birth year. Five wrong
  answers lock the link for 15 minutes, each further lock twice as long
  (at most a day); the count and the lock are columns of the link, set and
  judged by the database's clock, so every process and node sees them. The right answer gets
  a cookie for an hour, signed with a key of the link (:func:`answered_cookie`).
  The year is a weak secret on its own (a hundred likely values): it keeps
  a photo of the receipt, or a lost one, from being enough; the token is
  what cannot be guessed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, Select, func, or_, select, update

from .audit import patient_cx
from .errors import RefusedRequest
from .index.db import db_now, write_transaction
from .index.models import Order, Patient, ShareLink as ShareLinkRow, Study
from .lockouts import lock_length
from .share_orders import (
    WITHDRAWN,
    OrderTarget,
    bound_order,
    order_statuses,
    order_studies,
    order_target,
    orders_of_study,
)

shares_t = ShareLinkRow.__table__
studies_t = Study.__table__
patients_t = Patient.__table__
orders_t = Order.__table__

# 24 random bytes: 192 bits, 32 URL-safe base64 characters.
TOKEN_BYTES = 24
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{32}")
# Where a link's page is, under the app's root.
PATH_PREFIX = "/share/"
# The birth-year check: wrong answers before a lock (pacs.lockouts: how long).
BIRTH_YEAR_TRIES = 5
# How long a right answer lets the browser load the page's data.
ANSWERED_FOR = timedelta(hours=1)
# `pacs share list` without --study: the newest this many.
LIST_LIMIT = 1000


class ShareError(RefusedRequest):
    """A share link request refused, with the HTTP status a client sees;
    *link* names the link when it exists (a 410's audit event)."""

    def __init__(self, message: str, http_status: int, link: ShareLink | None = None) -> None:
        super().__init__(message, http_status)
        self.link = link


@dataclass(frozen=True)
class ShareLink:
    """A share link as the index holds it, with its study (a study link)
    or its order's accession (an order link), and the birth year of its
    patient ("" when the index has no birth date)."""

    id: int
    # A study link's study; "" for an order link.
    study_uid: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str
    last_used_at: datetime | None
    uses: int
    failed_answers: int
    locked_until: datetime | None
    # An order link's order (its accession number); "" for a study link.
    accession: str = ""
    # The order's procedure status (pacs.orders.procedure_status), when read.
    order_status: str = ""
    # The Study Instance UID the order hands modalities: what an order
    # link's audit events name before (or besides) the studies it shows.
    order_study_uid: str = field(default="", repr=False)
    # The order's row the link names (its first step's).
    order_pk: int = field(default=0, repr=False)
    birth_year: str = field(default="", repr=False)
    cookie_key: str = field(default="", repr=False)
    # The patient the study (the order) is filed under now (an HIS match or merge moves it).
    patient_pk: int = field(default=0, repr=False)
    # That patient as audit events name it (ID^^^issuer).
    patient: str = field(default="", repr=False)

    @property
    def kind(self) -> str:
        """"study" or "order"."""
        return "order" if self.accession else "study"

    @property
    def audit_study(self) -> str:
        """The study an audit event about the link names: the study of a
        study link, the order's Study Instance UID for an order link."""
        return self.study_uid or self.order_study_uid

    def state(self, now: datetime | None = None) -> str:
        """"active", "expired" or "revoked"."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= (now or datetime.now(UTC)) else "active"

    def as_dict(self) -> dict[str, Any]:
        """The link as the API and `pacs share list --json` show it: never a
        token (none is kept), nor the birth year or the cookie key."""
        data = asdict(self)
        for hidden in ("birth_year", "cookie_key", "patient_pk", "patient", "order_study_uid", "order_pk"):
            del data[hidden]
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        data["kind"] = self.kind
        data["state"] = self.state()
        return data


@dataclass(frozen=True)
class NewShare:
    """A link just made, with its token: shown this once, never kept."""

    link: ShareLink
    token: str

    @property
    def path(self) -> str:
        """The link's page under the app's root: ``/share/TOKEN``."""
        return share_path(self.token)

    def url(self, base: str) -> str:
        """The link's page under *base* (``https://pacs.benhvien.vn``); the
        path alone when *base* is empty."""
        return base.rstrip("/") + self.path


def share_path(token: str) -> str:
    """The page of the link *token*, under the app's root."""
    return f"{PATH_PREFIX}{token}"


def is_token_shaped(token: str) -> bool:
    """Whether *token* can be a link's token at all: anything else is a 404
    without asking the index."""
    return _TOKEN_SHAPE.fullmatch(token) is not None


def token_hash(token: str) -> str:
    """What the index keeps of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def birth_year_of(birth_date: str) -> str:
    """The year of a DICOM birth date (``YYYYMMDD``, or a legacy form that
    starts with the year); "" when it has none."""
    match = re.match(r"\s*(\d{4})", birth_date or "")
    return match.group(1) if match and 1800 <= int(match.group(1)) <= 2200 else ""


def days_asked(days: int | None, default: int, maximum: int) -> int:
    """The lifetime of a new link: *days*, else *default*; a ShareError
    (400) outside 1..*maximum*."""
    days = default if days is None else days
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= maximum:
        raise ShareError(f"days must be 1-{maximum} (share_days_max), not {days!r}", 400)
    return days


def _select() -> Select[Any]:
    """A link with its study or order, and the patient either is filed
    under now (an order's patient: the patient of every step of it)."""
    return (select(shares_t, studies_t.c.study_uid, orders_t.c.accession_number,
                   orders_t.c.study_uid.label("order_study_uid"), patients_t.c.pk.label("patient_pk"),
                   patients_t.c.birth_date, patients_t.c.patient_id, patients_t.c.issuer)
            .outerjoin(studies_t, studies_t.c.pk == shares_t.c.study_pk)
            .outerjoin(orders_t, orders_t.c.pk == shares_t.c.order_pk)
            .join(patients_t, patients_t.c.pk == func.coalesce(studies_t.c.patient_pk, orders_t.c.patient_pk)))


def _link(row: Row[Any], order_status: str = "") -> ShareLink:
    return ShareLink(
        id=row.pk, study_uid=row.study_uid or "", created_by=row.created_by, created_at=row.created_at,
        expires_at=row.expires_at, revoked_at=row.revoked_at, revoked_by=row.revoked_by,
        last_used_at=row.last_used_at, uses=row.uses, failed_answers=row.failed_answers,
        locked_until=row.locked_until, accession=row.accession_number or "", order_status=order_status,
        order_study_uid=row.order_study_uid or "", order_pk=row.order_pk or 0,
        birth_year=birth_year_of(row.birth_date), cookie_key=row.cookie_key, patient_pk=row.patient_pk,
        patient=patient_cx(row.patient_id, row.issuer),
    )


def _links(conn: Connection, rows: list[Row[Any]]) -> list[ShareLink]:
    """The links of *rows*, an order link's with its order's status."""
    statuses = order_statuses(conn, {row.order_pk for row in rows if row.order_pk})
    return [_link(row, statuses.get(row.order_pk, "")) for row in rows]


def _expiry(days: int | None, expires_at: datetime | None, now: datetime) -> datetime:
    if expires_at is not None:
        return expires_at
    if days is None:
        raise ValueError("give days or expires_at")
    return now + timedelta(days=days)


def _insert(conn: Connection, token: str, created_by: str, now: datetime, expires_at: datetime,
            **target: int) -> ShareLink:
    """Write the link of *token* to *target* (``study_pk=`` or ``order_pk=``)."""
    pk = conn.execute(shares_t.insert().values(
        token_hash=token_hash(token), **target, created_by=created_by[:200], created_at=now,
        expires_at=expires_at, revoked_by="", uses=0, failed_answers=0, lockouts=0,
        cookie_key=secrets.token_hex(32),
    )).inserted_primary_key[0]
    return _links(conn, [conn.execute(_select().where(shares_t.c.pk == pk)).one()])[0]


def create(engine: Engine, study_uid: str, created_by: str, *, days: int | None = None,
           expires_at: datetime | None = None) -> NewShare:
    """A new link to the study *study_uid* lasting *days* (checked by the
    caller: :func:`days_asked`), or until *expires_at* (tests, imports of
    links made elsewhere). A ShareError (404) when there is no such study."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = datetime.now(UTC)
    expires_at = _expiry(days, expires_at, now)
    with write_transaction(engine) as conn:
        study_pk = conn.execute(select(studies_t.c.pk).where(studies_t.c.study_uid == study_uid)).scalar()
        if study_pk is None:
            raise ShareError(f"no study {study_uid}", 404)
        return NewShare(_insert(conn, token, created_by, now, expires_at, study_pk=study_pk), token)


def shareable_order(conn: Connection, accession: str) -> OrderTarget:
    """The order *accession* a link may be made for: a ShareError 404 when
    there is none, 409 when the accession's rows make several orders (see
    :mod:`pacs.share_orders`) or the HIS withdrew it."""
    target = order_target(conn, accession)
    if target is None:
        raise ShareError(f"no order {accession}", 404)
    if target.procedures > 1:
        raise ShareError(f"accession number {accession} is held by {target.procedures} orders (different "
                         "patients, Study Instance UIDs or Requested Procedure IDs): a link to it could show "
                         "another order's images; make the link for the study instead (POST "
                         "/api/studies/{uid}/shares) once it arrives", 409)
    if target.status in WITHDRAWN and not order_studies(conn, target.pk):
        raise ShareError(f"order {accession} is {target.status.lower()}: no link made", 409)
    return target


def create_for_order(engine: Engine, accession: str, created_by: str, *, days: int | None = None,
                     expires_at: datetime | None = None) -> NewShare:
    """A new link to the order *accession*, made before its images exist
    (the receipt printed at registration): it shows the studies linked to
    the order, when they come. *days*, *expires_at* as :func:`create`;
    refused as :func:`shareable_order` says."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = datetime.now(UTC)
    expires_at = _expiry(days, expires_at, now)
    with write_transaction(engine) as conn:
        target = shareable_order(conn, accession)
        return NewShare(_insert(conn, token, created_by, now, expires_at, order_pk=target.pk), token)


def find_order(engine: Engine, accession: str) -> OrderTarget | None:
    """The order *accession* (None: no such order), for the callers' checks
    (the referring physician's) and audit before a link is made."""
    with engine.connect() as conn:
        return order_target(conn, accession)


def links(engine: Engine, study_uid: str | None = None, *, accession: str | None = None,
          limit: int = LIST_LIMIT) -> list[ShareLink]:
    """Links newest first: those that show the study *study_uid* (its own,
    and those of the orders it is linked to), or the links of the order
    *accession*; every link when neither is given."""
    stmt = _select().order_by(shares_t.c.pk.desc()).limit(limit)
    if study_uid is not None:
        stmt = stmt.where(or_(studies_t.c.study_uid == study_uid,
                              orders_t.c.accession_number.in_(orders_of_study(study_uid))))
    if accession is not None:
        stmt = stmt.where(orders_t.c.accession_number == accession)
    with engine.connect() as conn:
        return _links(conn, list(conn.execute(stmt)))


def link(engine: Engine, link_id: int) -> ShareLink | None:
    """The link *link_id*, None when there is none."""
    with engine.connect() as conn:
        row = conn.execute(_select().where(shares_t.c.pk == link_id)).first()
        return _links(conn, [row])[0] if row is not None else None


def shown_studies(engine: Engine, found: ShareLink) -> list[str]:
    """The studies the link shows now: a study link's one; the studies
    linked to an order link's order (none before its images), oldest first."""
    if not found.order_pk:
        return [found.study_uid]
    with engine.connect() as conn:
        return order_studies(conn, found.order_pk)


def shown_order(engine: Engine, found: ShareLink) -> OrderTarget | None:
    """An order link's order as its page describes it (None: a study link)."""
    if not found.order_pk:
        return None
    with engine.connect() as conn:
        return bound_order(conn, found.order_pk)


def revoke(engine: Engine, link_id: int, revoked_by: str) -> tuple[ShareLink, bool]:
    """Revoke the link *link_id*: it answers 410 from now on, on every node.
    Returns the link and whether this call revoked it (False: it was
    already, and keeps who did and when). A ShareError (404) when there is
    no such link."""
    with write_transaction(engine) as conn:
        done = conn.execute(update(shares_t).where(shares_t.c.pk == link_id, shares_t.c.revoked_at.is_(None))
                            .values(revoked_at=datetime.now(UTC), revoked_by=revoked_by[:200])).rowcount
        row = conn.execute(_select().where(shares_t.c.pk == link_id)).first()
        if row is None:
            raise ShareError(f"no share link {link_id}", 404)
        return _links(conn, [row])[0], bool(done)


def open_link(engine: Engine, token: str) -> ShareLink:
    """The link of *token*, if it may show its study: a ShareError 404 for
    a token of the wrong shape (the index is not asked) or one no link has,
    410 for a link revoked or expired, or whose order the HIS withdrew
    (the message says "cancelled")."""
    if not is_token_shaped(token):
        raise ShareError("no such share link", 404)
    with engine.connect() as conn:
        row = conn.execute(_select().where(shares_t.c.token_hash == token_hash(token))).first()
        if row is None:
            raise ShareError("no such share link", 404)
        found = _links(conn, [row])[0]
    state = found.state()
    if state != "active":
        raise ShareError(f"this share link {'was revoked' if state == 'revoked' else 'has expired'}", 410, found)
    if found.order_status in WITHDRAWN and not shown_studies(engine, found):
        # Withdrawn after images were taken under it (discontinued mid-exam,
        # the procedure changed at billing): what was acquired is the
        # patient's and stays shown; "cancelled" only when nothing came.
        raise ShareError(f"the examination of this share link was cancelled (order {found.order_status.lower()})",
                         410, found)
    return found


def record_use(engine: Engine, link_id: int) -> None:
    """Count an opening of the link (its page read the study)."""
    with engine.begin() as conn:
        conn.execute(update(shares_t).where(shares_t.c.pk == link_id)
                     .values(uses=shares_t.c.uses + 1, last_used_at=datetime.now(UTC)))


# -- the birth-year check ----------------------------------------------------------
def needs_birth_year(found: ShareLink, enabled: bool) -> bool:
    """Whether the link's page must ask the birth year first (*enabled*:
    the share_birth_year setting); never for a patient without a birth date."""
    return enabled and bool(found.birth_year)


@dataclass(frozen=True)
class Answer:
    """The outcome of a birth year given: *right*; else the wrong answers
    left before a lock, or the lock (*locked_until*) and whether this
    answer set it (*new_lock*, for the audit trail)."""

    right: bool
    tries_left: int = 0
    locked_until: datetime | None = None
    new_lock: bool = False


def answer_birth_year(engine: Engine, found: ShareLink, answer: str) -> Answer:
    """Check the birth year *answer* for the link *found*, counting a wrong
    one in the index: read, judged and written in one transaction with the
    link's row locked (SQLite: the write lock), so answers sent at once, to
    several nodes, are each counted. A locked link judges nothing until the
    lock ends. ShareError 400 for an answer that is not a year (not counted)."""
    answer = answer.strip()
    # ASCII digits only: \d alone also takes "１９７５" or "١٩٧٥", which
    # compare_digest refuses (a TypeError, a 500) and the page never sends.
    if not re.fullmatch(r"\d{4}", answer, re.ASCII):
        raise ShareError("the birth year is 4 digits (e.g. 1975)", 400)
    with write_transaction(engine) as conn:
        row = conn.execute(select(shares_t.c.failed_answers, shares_t.c.locked_until, shares_t.c.lockouts)
                           .where(shares_t.c.pk == found.id).with_for_update()).first()
        if row is None:
            raise ShareError("no such share link", 404)
        # The database's clock: a lock another node set holds here too, whatever this node's clock says.
        now = db_now(conn)
        if row.locked_until is not None and row.locked_until > now:
            return Answer(False, 0, row.locked_until)
        if hmac.compare_digest(answer, found.birth_year):
            conn.execute(update(shares_t).where(shares_t.c.pk == found.id)
                         .values(failed_answers=0, locked_until=None, lockouts=0))
            return Answer(True)
        failures = row.failed_answers + 1
        if failures >= BIRTH_YEAR_TRIES:
            until = now + lock_length(row.lockouts + 1)
            conn.execute(update(shares_t).where(shares_t.c.pk == found.id)
                         .values(failed_answers=0, locked_until=until, lockouts=row.lockouts + 1))
            return Answer(False, 0, until, new_lock=True)
        conn.execute(update(shares_t).where(shares_t.c.pk == found.id).values(failed_answers=failures))
        return Answer(False, BIRTH_YEAR_TRIES - failures)


# What answered_cookie makes: ID.EXPIRES.SIGNATURE (hex SHA-256), ASCII.
_COOKIE_SHAPE = re.compile(r"(\d{1,19})\.(\d{1,12})\.([0-9a-f]{64})", re.ASCII)


def _signature(found: ShareLink, expires: int) -> str:
    # Over the patient and the year answered too: a study the HIS refiles
    # under another patient (matched by hand to the right order) asks that
    # patient's year again, instead of showing them to whoever answered the first.
    message = f"{found.id}.{expires}.{found.patient_pk}.{found.birth_year}"
    return hmac.new(bytes.fromhex(found.cookie_key), message.encode(), "sha256").hexdigest()


def answered_cookie(found: ShareLink, now: datetime | None = None) -> str:
    """The cookie value that says this browser answered the link's birth
    year, for :data:`ANSWERED_FOR`: ``ID.EXPIRES.SIGNATURE``, signed with
    the link's own key (kept in the index: any node checks it), valid while
    the study stays filed under the same patient with the same birth year."""
    expires = int(((now or datetime.now(UTC)) + ANSWERED_FOR).timestamp())
    return f"{found.id}.{expires}.{_signature(found, expires)}"


def cookie_valid(found: ShareLink, value: str | None, now: datetime | None = None) -> bool:
    """Whether *value* is a cookie :func:`answered_cookie` made for this
    link that has not expired."""
    # The client's own bytes: anything but what answered_cookie makes is no
    # cookie (int() refuses 5000 digits or a "²", compare_digest non-ASCII).
    match = _COOKIE_SHAPE.fullmatch(value or "")
    if match is None or match.group(1) != str(found.id):
        return False
    expires = int(match.group(2))
    if expires <= (now or datetime.now(UTC)).timestamp():
        return False
    return hmac.compare_digest(match.group(3), _signature(found, expires))


# -- the QR code -------------------------------------------------------------------
def qr_svg(url: str) -> str:
    """The QR code of *url* as an SVG document (segno, pure Python)."""
    import io

    import segno

    out = io.BytesIO()
    # Error correction M: a crumpled or smudged receipt still scans.
    segno.make(url, error="m", micro=False).save(out, kind="svg", scale=4, border=4, xmldecl=False,
                                                   svgns=True, title="QR")
    return out.getvalue().decode()


def write_qr(url: str, path: str) -> None:
    """Write the QR code of *url* to *path*: SVG or PNG by its suffix
    (segno writes PNG itself; no imaging package needed)."""
    import segno

    kind = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if kind not in ("svg", "png"):
        raise ShareError(f"--qr {path}: the file must end in .svg or .png", 400)
    segno.make(url, error="m", micro=False).save(path, kind=kind, scale=8 if kind == "png" else 4, border=4)
