"""Users, roles and API tokens for the HTTP API.

Passwords are hashed with Argon2id; tokens are random 256-bit strings of
which only the sha256 is stored, so a copy of the database yields no usable
credential. A login creates a session token (expiring); API tokens for
systems (modalities, the HIS, the EMR) are created by an admin and revoked
by name.

Sessions end after SESSION_IDLE_MINUTES without use or SESSION_HOURS after
login, whichever comes first. Setting a user's password (``pacs user add`` of
an existing user: a reset) or disabling them ends their sessions; a reset
also revokes their API tokens unless the caller keeps them (a reset after a
compromise must not leave a stolen token working).

Logins are throttled per username and per client address, in the index (so
across nodes and restarts): too many failures in THROTTLE_WINDOW lock the
key for LOCK_FIRST, doubling with each lock in a row up to LOCK_MAX. Locks
are short on purpose: a permanent lockout would let anyone lock the admins
out for good by guessing wrong on their behalf. An attempt is counted before
its password is checked (and given back when it logs in), so guesses sent at
the same time get no more checks than guesses sent one by one; an attempt
whose process died while checking stays counted until its window ends.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Engine, Row, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from .errors import PacsError
from .index.db import write_transaction
from .index.models import ApiToken, LoginThrottle, ReadingClaim, User
from .roles import ROLES

log = logging.getLogger(__name__)
# The name of login session tokens (API tokens get other names).
SESSION = "session"
SESSION_HOURS = 12  # absolute lifetime of a session
SESSION_IDLE_MINUTES = 30  # a session unused this long has ended
# A used session's end is pushed forward at most once a minute: not a write per request.
_SESSION_REFRESH = timedelta(minutes=1)
# Login throttling (see the module doc).
THROTTLE_WINDOW = timedelta(minutes=15)
USER_FAILURES = 5
# Higher: many people share one address behind a hospital's NAT.
ADDRESS_FAILURES = 20
LOCK_FIRST = timedelta(minutes=1)
LOCK_MAX = timedelta(minutes=15)
_THROTTLE_PRUNE = timedelta(days=1)
users_t = User.__table__
tokens_t = ApiToken.__table__
throttle_t = LoginThrottle.__table__


class AuthError(PacsError):
    """Bad credentials or a bad request about users/tokens."""


class LoginThrottled(AuthError):
    """Too many failed logins for this username or client address: try again
    in *retry_after* seconds. *new_locks* names the locks this attempt set
    (for the audit trail), empty when the key was locked already."""

    def __init__(self, retry_after: int, new_locks: list[str]) -> None:
        super().__init__(f"too many failed logins: try again in {retry_after} s")
        self.retry_after = retry_after
        self.new_locks = new_locks


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user and their role."""

    username: str
    role: str
    display_name: str = ""


@dataclass(frozen=True)
class RefusedToken:
    """A token we issued that no longer authenticates: its user, its name
    (``session`` for a login session) and why (revoked, ended, expired,
    user disabled)."""

    username: str
    name: str
    reason: str

    def describe(self) -> str:
        """The refusal as the audit trail says it (never the token itself)."""
        what = "session" if self.name == SESSION else f"token {self.name!r}"
        return f"{what} of {self.username} {self.reason}"


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes: they were written in UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@dataclass
class _Throttle:
    """One throttle key's row, read for update (see LoginThrottle)."""

    key: str
    limit: int
    failures: int
    start: datetime | None
    locked_until: datetime | None
    lockouts: int


def _throttle_keys(username: str, client: str) -> list[tuple[str, int]]:
    """The throttle keys of a login attempt and their failure limits."""
    keys = [(f"u:{username}"[:128], USER_FAILURES)]
    if client:
        keys.append((f"a:{client}"[:128], ADDRESS_FAILURES))
    return keys


# The roles that claim studies for reading (viewer_api.claims_api.CLAIMERS).
READING_ROLES = ("radiologist", "admin")


def _end_claims(conn: Connection, username: str) -> None:
    """*username*'s reading claims end (pacs.reading_claims): disabled, or no longer a reader."""
    claims = ReadingClaim.__table__
    conn.execute(delete(claims).where(claims.c.username == username))


class AuthService:
    def __init__(self, engine: Engine, hasher: PasswordHasher | None = None) -> None:
        """*hasher* sets the cost of new password hashes (argon2's defaults
        when None); a stored hash carries its own, so any of them verifies."""
        self.engine = engine
        self._hasher = hasher or PasswordHasher()

    # -- users -----------------------------------------------------------------------
    def add_user(self, username: str, role: str, password: str | None = None, display_name: str = "",
                 *, revoke_tokens: bool = False) -> str:
        """Create (or update) a user; returns the password (generated if not given).

        Updating an existing user sets a new password: their sessions end
        (also those of a disabled user being enabled again, which would
        otherwise come back to life) and any login lock on the name is
        lifted; with *revoke_tokens* their API tokens are revoked too.
        """
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if not username or len(username) > 64 or not username.replace(".", "").replace("-", "").replace("_", "").isalnum():
            raise AuthError("username: 1-64 letters, digits, '.', '-' or '_'")
        password = password or secrets.token_urlsafe(12)
        if len(password) < 8:
            raise AuthError("password must be at least 8 characters")
        values = {"role": role, "password_hash": self._hasher.hash(password), "active": True,
                  "display_name": display_name or username}
        # Reads, then writes: see write_transaction. Found by the fuzz run
        # (bench/fuzz.py) adding a user while `pacs serve` was busy.
        with write_transaction(self.engine) as conn:
            exists = conn.execute(select(users_t.c.pk).where(users_t.c.username == username)).scalar()
            if exists is None:
                conn.execute(users_t.insert().values(username=username, created_at=datetime.now(UTC), **values))
            else:
                conn.execute(update(users_t).where(users_t.c.pk == exists).values(**values))
                _revoke_of_user(conn, exists, sessions_only=not revoke_tokens)
                conn.execute(delete(throttle_t).where(throttle_t.c.key == _throttle_keys(username, "")[0][0]))
                if role not in READING_ROLES:
                    # No longer one who reads: colleagues must not see their studies as being read.
                    _end_claims(conn, username)
        return password

    def disable_user(self, username: str) -> bool:
        """Disable a user and end their sessions (enabling them again must not
        bring old sessions back); their API tokens stop working while disabled.
        Their reading claims end: colleagues saw the studies as being read by
        someone who no longer can, for up to reading_claim_minutes, and had
        to take each over explicitly (an urgent study left waiting)."""
        with write_transaction(self.engine) as conn:
            user_pk = conn.execute(select(users_t.c.pk).where(users_t.c.username == username)).scalar()
            if user_pk is not None:
                conn.execute(update(users_t).where(users_t.c.pk == user_pk).values(active=False))
                _revoke_of_user(conn, user_pk, sessions_only=True)
                _end_claims(conn, username)
        return user_pk is not None

    def role_of(self, username: str) -> str | None:
        """The role of an existing user (None: no such user)."""
        with self.engine.connect() as conn:
            return conn.execute(select(users_t.c.role).where(users_t.c.username == username)).scalar()

    @staticmethod
    def describe_user_change(username: str, role: str, before: str | None, *, keep_tokens: bool) -> str:
        """What add_user does to *username* (whose role is *before*, None: new),
        for the audit trail and the operator."""
        if before is None:
            return f"user {username} created with role {role}"
        return (f"user {username} updated, role {before} -> {role}: password reset, sessions ended, "
                f"API tokens {'kept' if keep_tokens else 'revoked'}")

    def list_users(self) -> list[dict[str, object]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(users_t.c.username, users_t.c.display_name, users_t.c.role, users_t.c.active)
                .order_by(users_t.c.username)
            ).mappings().all()
        return [dict(r) for r in rows]

    def has_users(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(users_t.c.pk).limit(1)).first() is not None

    def ensure_admin(self) -> str | None:
        """On a fresh install, create `admin` with a random password (returned
        once, to be shown to the operator); None when users exist."""
        if self.has_users():
            return None
        return self.add_user("admin", "admin", display_name="Administrator")

    # -- tokens ----------------------------------------------------------------------
    def login(self, username: str, password: str, client: str = "") -> tuple[str, Principal]:
        """Check a password; return a new session token. Raises
        LoginThrottled while the username or the *client* address is locked
        or has its whole allowance of attempts in flight (without checking
        the password), and when this failure locks one."""
        keys = _throttle_keys(username, client)
        # The attempt is counted before the slow password check, not after:
        # counted after, every guess sent at the same time passed the lock
        # check before any of them had failed (60 at once got 33 checks).
        self._reserve(keys)
        row = self._check_password(username, password)
        if row is None:
            locks = self._failed(keys)
            if locks:
                raise LoginThrottled(max(seconds for _, seconds in locks),
                                     [f"{key[2:]} locked for {seconds} s" for key, seconds in locks])
            raise AuthError("wrong username or password")
        self._succeeded(keys)
        token = self._issue(row.pk, SESSION, timedelta(minutes=SESSION_IDLE_MINUTES))
        return token, Principal(row.username, row.role, row.display_name)

    def _check_password(self, username: str, password: str) -> Row[Any] | None:
        """The active user *username* if *password* is theirs, else None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(users_t).where(users_t.c.username == username)).first()
        if row is not None and row.active:
            try:
                return row if self._hasher.verify(row.password_hash, password) else None
            except (VerificationError, InvalidHashError):
                return None
        # Spend the same time as a real check: no user enumeration by timing.
        try:
            self._hasher.verify(self._hasher.hash("x"), "y")
        except VerificationError:
            pass
        return None

    def _throttle_rows(self, conn: Connection, keys: list[tuple[str, int]], now: datetime) -> list[_Throttle]:
        """The throttle rows of *keys*, created if missing and locked for this
        transaction (FOR UPDATE on PostgreSQL; SQLite's write_transaction
        holds the database's write lock), with an ended window started again."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        rows = []
        for key, limit in keys:
            # Insert-if-missing, then lock the row: two nodes counting the
            # same key at once neither collide nor lose an attempt.
            conn.execute(dialect.insert(throttle_t).values(
                key=key, failures=0, window_start=now, last_failure_at=now, lockouts=0,
            ).on_conflict_do_nothing())
            row = conn.execute(select(throttle_t).where(throttle_t.c.key == key).with_for_update()).one()
            state = _Throttle(key, limit, row.failures, _aware(row.window_start), _aware(row.locked_until),
                              row.lockouts)
            if state.start is None or now - state.start > THROTTLE_WINDOW:
                state.failures, state.start = 0, now
                # Locks "in a row" only: quiet for a while, the next lock is short again.
                if state.locked_until is None or now - state.locked_until > 4 * THROTTLE_WINDOW:
                    state.lockouts = 0
            rows.append(state)
        return rows

    def _reserve(self, keys: list[tuple[str, int]]) -> None:
        """Count a login attempt against each key before its password is
        checked, in one transaction with the check of the keys' locks:
        raises LoginThrottled (nothing counted) while a key is locked or has
        its limit of attempts failed or still being checked. Attempts are
        failures until _succeeded gives theirs back."""
        now = datetime.now(UTC)
        with write_transaction(self.engine) as conn:
            conn.execute(delete(throttle_t).where(throttle_t.c.last_failure_at < now - _THROTTLE_PRUNE))
            rows = self._throttle_rows(conn, keys, now)
            left = [(r.locked_until - now).total_seconds() for r in rows
                    if r.locked_until is not None and r.locked_until > now]
            if left:
                raise LoginThrottled(int(max(left)) + 1, [])
            if any(r.failures >= r.limit for r in rows):
                # The last allowed attempts are still being checked: they end
                # in a lock or a login within a second. Raising rolls back.
                raise LoginThrottled(1, [])
            for r in rows:
                conn.execute(update(throttle_t).where(throttle_t.c.key == r.key).values(
                    failures=r.failures + 1, window_start=r.start, last_failure_at=now, lockouts=r.lockouts))

    def _failed(self, keys: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """A reserved attempt failed: lock each key whose count (failures and
        attempts still being checked, all counted as failures) reached its
        limit; returns the keys this failure locked, with the lock's length
        in seconds. A key a concurrent failure locked already stays as it is."""
        now = datetime.now(UTC)
        locks: list[tuple[str, int]] = []
        with write_transaction(self.engine) as conn:
            for r in self._throttle_rows(conn, keys, now):
                if r.failures == 0 and (r.locked_until is None or r.locked_until <= now):
                    # Our reservation went (a login reset the name's count, or
                    # the window ended meanwhile): this failure counts again.
                    r.failures = 1
                if r.locked_until is not None and r.locked_until > now:
                    continue
                if r.failures >= r.limit:
                    r.lockouts += 1
                    length = min(LOCK_FIRST * 2 ** (r.lockouts - 1), LOCK_MAX)
                    r.locked_until, r.failures, r.start = now + length, 0, now
                    locks.append((r.key, int(length.total_seconds())))
                conn.execute(update(throttle_t).where(throttle_t.c.key == r.key).values(
                    failures=r.failures, window_start=r.start, last_failure_at=now, locked_until=r.locked_until,
                    lockouts=r.lockouts))
        return locks

    def _succeeded(self, keys: list[tuple[str, int]]) -> None:
        """A reserved attempt logged in. The name's count starts again; the
        address only gets this attempt back (a valid login of the attacker's
        own account must not reset their guesses)."""
        with write_transaction(self.engine) as conn:
            conn.execute(delete(throttle_t).where(throttle_t.c.key == keys[0][0]))
            for key, _ in keys[1:]:
                conn.execute(update(throttle_t).where(throttle_t.c.key == key, throttle_t.c.failures > 0)
                             .values(failures=throttle_t.c.failures - 1))

    def create_token(self, username: str, name: str, days: int | None = None) -> str:
        """An API token for a system account (or a person), optionally expiring."""
        with self.engine.connect() as conn:
            user_pk = conn.execute(select(users_t.c.pk).where(users_t.c.username == username)).scalar()
        if user_pk is None:
            raise AuthError(f"no user {username!r}")
        if name == SESSION:
            # Tokens of that name are sessions: they would expire when idle.
            raise AuthError(f"token name {SESSION!r} is reserved for login sessions")
        return self._issue(user_pk, name, timedelta(days=days) if days else None)

    def _issue(self, user_pk: int, name: str, lifetime: timedelta | None) -> str:
        token = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            if name == SESSION:
                # Ended sessions (logged out, revoked, expired) serve nothing
                # more: one row per login was kept for good. The audit trail
                # keeps the logins and logouts.
                conn.execute(delete(tokens_t).where(
                    tokens_t.c.name == SESSION, or_(tokens_t.c.revoked.is_(True), tokens_t.c.expires_at < now)))
            conn.execute(
                tokens_t.insert().values(
                    user_pk=user_pk, token_hash=_hash_token(token), name=name, created_at=now,
                    expires_at=now + lifetime if lifetime else None, revoked=False,
                )
            )
        return token

    def revoke(self, *, token: str | None = None, username: str | None = None, name: str | None = None) -> int:
        """Revoke a token (by value, or a user's tokens of a name); returns how many."""
        with write_transaction(self.engine) as conn:
            stmt = update(tokens_t).values(revoked=True)
            if token is not None:
                stmt = stmt.where(tokens_t.c.token_hash == _hash_token(token))
            else:
                user_pk = conn.execute(select(users_t.c.pk).where(users_t.c.username == username)).scalar()
                stmt = stmt.where(tokens_t.c.user_pk == user_pk)
                if name:
                    stmt = stmt.where(tokens_t.c.name == name)
            done = conn.execute(stmt).rowcount
        return int(done)

    def authenticate(self, token: str, *, use: bool = True) -> Principal | None:
        """The principal a token stands for, or None (unknown, revoked, expired).
        *use* False: a request the page made by itself (the worklist's automatic
        refresh), which does not push a session's idle end: a workstation left on
        the worklist still signs out after SESSION_IDLE_MINUTES."""
        # Asked of the index on every request, not cached: a token revoked or
        # a user disabled on one node (or by the CLI) must stop working on
        # every node at once. A cache of 5 s let a leaked token go on reading
        # on the other node after its revocation; the look-up is one indexed row.
        key = _hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(users_t.c.username, users_t.c.role, users_t.c.display_name, users_t.c.active,
                       tokens_t.c.expires_at, tokens_t.c.revoked, tokens_t.c.name, tokens_t.c.created_at)
                .join(users_t, users_t.c.pk == tokens_t.c.user_pk)
                .where(tokens_t.c.token_hash == key)
            ).first()
        principal = None
        if row is not None and row.active and not row.revoked:
            expires = _aware(row.expires_at)
            wall = datetime.now(UTC)
            if expires is None or expires > wall:
                principal = Principal(row.username, row.role, row.display_name)
                if use and row.name == SESSION and expires is not None:
                    self._touch_session(key, _aware(row.created_at), expires, wall)
        return principal

    def refused(self, token: str) -> RefusedToken | None:
        """Whose token *token* is and why :meth:`authenticate` refuses it
        (revoked, expired, user disabled), for the audit trail of the
        refused request: a revoked token still in use is who used it, not an
        anonymous caller. None for a token we never issued (or one whose row
        is gone: an ended session is removed at its user's next login)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(users_t.c.username, users_t.c.active, tokens_t.c.name, tokens_t.c.revoked,
                       tokens_t.c.expires_at)
                .join(users_t, users_t.c.pk == tokens_t.c.user_pk)
                .where(tokens_t.c.token_hash == _hash_token(token))
            ).first()
        if row is None:
            return None
        expires = _aware(row.expires_at)
        if row.revoked:
            reason = "ended" if row.name == SESSION else "revoked"
        elif expires is not None and expires <= datetime.now(UTC):
            reason = "expired"
        elif not row.active:
            reason = "user disabled"
        else:
            reason = "refused"  # valid again since (a race with a re-enabled user): still this request's answer
        return RefusedToken(row.username, row.name, reason)

    def _touch_session(self, key: str, created: datetime | None, expires: datetime, now: datetime) -> None:
        """A session in use: push its end to SESSION_IDLE_MINUTES from now,
        never past SESSION_HOURS after login (the idle timeout)."""
        idle = timedelta(minutes=SESSION_IDLE_MINUTES)
        if expires - now > idle - _SESSION_REFRESH:
            return  # pushed less than a minute ago
        end = now + idle
        if created is not None:
            end = min(end, created + timedelta(hours=SESSION_HOURS))
        if end <= expires:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(update(tokens_t).where(tokens_t.c.token_hash == key, tokens_t.c.revoked.is_(False))
                             .values(expires_at=end))
        except SQLAlchemyError as exc:
            # The request goes on: the session merely ends sooner if this never succeeds.
            log.warning("could not extend a session: %s", exc)


def _revoke_of_user(conn: Connection, user_pk: int, *, sessions_only: bool) -> None:
    """Revoke a user's sessions (and, unless *sessions_only*, API tokens)."""
    stmt = update(tokens_t).where(tokens_t.c.user_pk == user_pk, tokens_t.c.revoked.is_(False)).values(revoked=True)
    if sessions_only:
        stmt = stmt.where(tokens_t.c.name == SESSION)
    conn.execute(stmt)
