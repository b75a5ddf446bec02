"""Portable upsert helper shared by the index writers."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


@lru_cache(maxsize=64)
def _insert_ignore_stmt(dialect_name: str, table: Table, keys: tuple[str, ...]) -> Any:
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys)).returning(next(iter(table.primary_key.columns)))


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any], keys: list[str]) -> Any:
    """INSERT ... ON CONFLICT (keys) DO NOTHING RETURNING the primary key;
    None if the row existed.

    The statement is built once per table and executed with parameters, so
    SQLAlchemy's compiled cache is hit on the ingest hot path.
    """
    stmt = _insert_ignore_stmt(conn.dialect.name, table, tuple(keys))
    return conn.execute(stmt, values).scalar()
