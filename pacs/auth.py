"""Users, roles and API tokens for the HTTP API.

Passwords are hashed with Argon2id; tokens are random 256-bit strings of
which only the sha256 is stored, so a copy of the database yields no usable
credential. A login creates a session token (expiring); API tokens for
systems (modalities, the HIS, the EMR) are created by an admin and revoked
by name.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, select, update

from .errors import PacsError
from .index.db import write_transaction
from .index.models import ApiToken, User

ROLES = ("modality", "radiologist", "referring", "emr", "his", "admin")
SESSION_HOURS = 12
users_t = User.__table__
tokens_t = ApiToken.__table__


class AuthError(PacsError):
    """Bad credentials or a bad request about users/tokens."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user and their role."""

    username: str
    role: str
    display_name: str = ""


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AuthService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._hasher = PasswordHasher()
        # Token checks happen on every request: cache them briefly.
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    # -- users -----------------------------------------------------------------------
    def add_user(self, username: str, role: str, password: str | None = None, display_name: str = "") -> str:
        """Create (or update) a user; returns the password (generated if not given)."""
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
        self._cache.clear()
        return password

    def disable_user(self, username: str) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(update(users_t).where(users_t.c.username == username).values(active=False)).rowcount
        self._cache.clear()
        return bool(done)

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
    def login(self, username: str, password: str) -> tuple[str, Principal]:
        """Check a password; return a new session token."""
        with self.engine.connect() as conn:
            row = conn.execute(select(users_t).where(users_t.c.username == username)).first()
        ok = False
        if row is not None and row.active:
            try:
                ok = self._hasher.verify(row.password_hash, password)
            except (VerificationError, InvalidHashError):
                ok = False
        else:
            # Spend the same time as a real check: no user enumeration by timing.
            try:
                self._hasher.verify(self._hasher.hash("x"), "y")
            except VerificationError:
                pass
        if not ok or row is None:
            raise AuthError("wrong username or password")
        token = self._issue(row.pk, "session", timedelta(hours=SESSION_HOURS))
        return token, Principal(row.username, row.role, row.display_name)

    def create_token(self, username: str, name: str, days: int | None = None) -> str:
        """An API token for a system account (or a person), optionally expiring."""
        with self.engine.connect() as conn:
            user_pk = conn.execute(select(users_t.c.pk).where(users_t.c.username == username)).scalar()
        if user_pk is None:
            raise AuthError(f"no user {username!r}")
        return self._issue(user_pk, name, timedelta(days=days) if days else None)

    def _issue(self, user_pk: int, name: str, lifetime: timedelta | None) -> str:
        token = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
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
        self._cache.clear()
        return int(done)

    def authenticate(self, token: str) -> Principal | None:
        """The principal a token stands for, or None (unknown, revoked, expired)."""
        key = _hash_token(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < 5.0:
                return hit[1]
        with self.engine.connect() as conn:
            row = conn.execute(
                select(users_t.c.username, users_t.c.role, users_t.c.display_name, users_t.c.active,
                       tokens_t.c.expires_at, tokens_t.c.revoked)
                .join(users_t, users_t.c.pk == tokens_t.c.user_pk)
                .where(tokens_t.c.token_hash == key)
            ).first()
        principal = None
        if row is not None and row.active and not row.revoked:
            expires = row.expires_at
            if expires is not None and expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)
            if expires is None or expires > datetime.now(UTC):
                principal = Principal(row.username, row.role, row.display_name)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now, principal)
        return principal
