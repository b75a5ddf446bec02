"""When the index schema may be created or upgraded, and by whom.

A new index is created by any command. An existing index at an older
revision is upgraded only by `pacs serve` and `pacs db upgrade`, and only
when no older server still uses it: an older version cannot work on the
upgraded schema (migration 0013 changed the patients' unique key, and the
old server then refused every C-STORE with A703). Every other command
says what to do instead of upgrading under a running server.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, text

from ..errors import PacsError
from . import MIGRATIONS, alembic_config, current_revision, revision_of, upgrade_schema
from .db import APPLICATION_NAME, SCHEMA_HEAD, is_sqlite

log = logging.getLogger(__name__)


class SchemaError(PacsError):
    """The index is at a revision this command must not or cannot use."""


def head_revision(engine: Engine) -> str:
    """The newest revision among the migration scripts (SCHEMA_HEAD names it)."""
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(alembic_config(engine)).get_current_head())


def prepare_schema(engine: Engine, *, upgrade: bool, others: str = "") -> None:
    """Create a new index; upgrade an older one when *upgrade*; otherwise
    raise :class:`SchemaError` with what the operator should do. *others*
    names other servers known to use the index (they forbid an upgrade)."""
    # SCHEMA_HEAD, not head_revision(): loading the scripts to learn it cost
    # every start half a second (tests/test_migrations checks they agree).
    current, head = current_revision(engine), SCHEMA_HEAD
    if current == head:
        return
    if current is not None:
        _refuse(engine, current, head, upgrade, others)  # before the schema lock: a plain refusal waits for nothing

    def guard(conn: Connection) -> None:
        # Under the schema lock: another node may have done it meanwhile.
        now = revision_of(conn)
        if now in (None, head):
            return
        _refuse(engine, now, head, upgrade, others or (other_servers(conn) if not is_sqlite(engine) else ""))
        log.warning("upgrading the index schema from revision %s to %s", now, head)
        upgraded.append(now)

    upgraded: list[str] = []
    upgrade_schema(engine, guard=guard)
    if upgraded:
        log.warning("index schema upgraded from revision %s to %s", upgraded[0], head)


def known_revision(revision: str) -> bool:
    """Whether *revision* is one of this version's migrations: an index (or
    a backup of one) at another was written by a newer version."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return revision in {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}


def _refuse(engine: Engine, current: str, head: str, upgrade: bool, others: str) -> None:
    if not known_revision(current):
        raise SchemaError(f"the index is at schema revision {current}, written by a newer version of "
                          f"filmless-pacs (this one knows revisions up to {head}): run the newer version, or "
                          "restore the backup taken before its upgrade")
    if not upgrade or others:
        where = f" ({others})" if others else ""
        raise SchemaError(f"the index is at schema revision {current}; this version of filmless-pacs needs {head}. "
                          f"Stop every pacs serve that uses this index{where} -- an older version cannot work on "
                          "the upgraded index -- then run `pacs db upgrade` or start `pacs serve`")


def other_servers(conn: Connection) -> str:
    """Sessions of the archive's servers of another version on this
    PostgreSQL database ("" when none). Sessions carry the schema revision of
    their code in their name; versions before that connect without a name
    (a DBA's psql or a monitoring tool has its own). Nodes of this version,
    starting beside us, do not count."""
    return _sessions(conn, f"{APPLICATION_NAME} {SCHEMA_HEAD}%")


def sessions_besides(conn: Connection, role: str) -> str:
    """Sessions of the archive's servers (any version) on this PostgreSQL
    database other than those of an engine made with *role* ("" when none)."""
    return _sessions(conn, f"{APPLICATION_NAME} % {role}")


def _sessions(conn: Connection, excluded: str) -> str:
    """The archive's sessions (named ours, or unnamed) other than this one and
    those whose name is LIKE *excluded*, counted per client address."""
    rows = conn.execute(text(
        "SELECT coalesce(host(client_addr), 'local socket') AS client, count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
        "AND (application_name = '' OR application_name LIKE :ours) AND application_name NOT LIKE :excluded "
        "GROUP BY 1 ORDER BY 1"
    ), {"ours": f"{APPLICATION_NAME}%", "excluded": excluded}).all()
    return ", ".join(f"{r.n} connection(s) from {r.client}" for r in rows)


__all__ = ["SchemaError", "head_revision", "known_revision", "other_servers", "prepare_schema",
           "sessions_besides"]
