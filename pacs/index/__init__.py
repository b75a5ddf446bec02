"""The SQL index: schema, engine, migrations, the group-committed writer and reads."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from .db import create_index_engine, is_sqlite
from .models import Base

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    """An Alembic config bound to *engine* (no alembic.ini needed)."""
    # Alembic is imported only when a schema changes or is compared with the
    # scripts: it costs every start of every command otherwise.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade_schema(engine: Engine, revision: str = "head", *,
                   guard: Callable[[Connection], None] | None = None) -> None:
    """Bring the schema to *revision*; safe when several nodes start at once.

    *guard* is called on the migrating connection once it holds the schema
    lock (PostgreSQL), before anything changes; it raises to refuse."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.connect().execution_options(immediate=True) as conn:
        if not is_sqlite(engine):
            # Two nodes starting together must not both create the tables.
            key = int(hashlib.sha1(b"filmless-pacs-schema").hexdigest()[:15], 16)
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
        cfg.attributes["connection"] = conn
        if is_sqlite(engine):
            # A migration that rebuilds a table (SQLite cannot alter a
            # constraint) must run with foreign keys off, or dropping the old
            # table deletes or refuses what refers to it. Only outside a
            # transaction does the pragma take effect: on the driver's own
            # connection, before SQLAlchemy begins one.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            if guard is not None:
                guard(conn)
                conn.commit()
            command.upgrade(cfg, revision)
        finally:
            conn.rollback()
            if is_sqlite(engine):
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]
            else:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def revision_of(conn: Connection) -> str | None:
    """The schema revision the index on *conn* is at (None for a new, empty index)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def current_revision(engine: Engine) -> str | None:
    """The schema revision the index is at (None for a new, empty index)."""
    with engine.connect() as conn:
        return revision_of(conn)


__all__ = ["Base", "alembic_config", "create_index_engine", "current_revision", "revision_of", "upgrade_schema"]
