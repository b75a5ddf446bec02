"""Portable upsert helper shared by the index writers."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Table, bindparam, exists, select, text
from sqlalchemy.dialects import postgresql, sqlite


@lru_cache(maxsize=64)
def _insert_ignore_stmt(dialect_name: str, table: Table, keys: tuple[str, ...], where: str | None,
                        returning: bool = True) -> Any:
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    stmt = dialect.insert(table).on_conflict_do_nothing(
        index_elements=list(keys), index_where=text(where) if where else None,
    )
    return stmt.returning(next(iter(table.primary_key.columns))) if returning else stmt


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any], keys: list[str],
                  where: str | None = None) -> Any:
    """INSERT ... ON CONFLICT (keys) DO NOTHING RETURNING the primary key;
    None if the row existed. *where* names the rows a partial unique index
    on *keys* covers (the databases infer the index from it).

    The statement is built once per table and executed with parameters, so
    SQLAlchemy's compiled cache is hit on the ingest hot path.
    """
    stmt = _insert_ignore_stmt(conn.dialect.name, table, tuple(keys), where)
    return conn.execute(stmt, values).scalar()


def insert_ignore_rows(conn: Connection, table: Table, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """:func:`insert_ignore` of several rows in one statement, returning nothing."""
    conn.execute(_insert_ignore_stmt(conn.dialect.name, table, tuple(keys), None, returning=False), rows)


@lru_cache(maxsize=16)
def _insert_into_parent_stmt(dialect_name: str, table: Table, keys: tuple[str, ...], conflict: str,
                             parent: Table, parent_fk: str, parent_key: str, barred: Table | None,
                             barred_unless: str | None) -> Any:
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    binds = {name: bindparam(name, type_=table.c[name].type) for name in keys}
    source = select(*binds.values()).select_from(parent).where(
        parent.c.pk == binds[parent_fk], parent.c[parent_key] == bindparam("expected_parent_key"))
    if barred is not None:
        bar = exists().where(barred.c[conflict] == binds[conflict])
        if barred_unless is not None:
            bar = bar.where(barred.c[barred_unless].is_(None))
        source = source.where(~bar)
    return (dialect.insert(table).from_select(list(keys), source)
            .on_conflict_do_nothing(index_elements=[conflict]).returning(next(iter(table.primary_key.columns))))


def insert_under_parent(conn: Connection, table: Table, values: dict[str, Any], conflict: str,
                        parent: Table, parent_fk: str, parent_key: str, expected: str,
                        barred: Table | None = None, barred_unless: str | None = None) -> Any:
    """INSERT ... SELECT ... FROM parent WHERE parent.pk = values[parent_fk]
    AND parent.<parent_key> = expected ON CONFLICT (conflict) DO NOTHING
    RETURNING the primary key: None if the row existed *or* the parent key
    no longer names that parent (deleted, or its key given to another row
    by SQLite) *or* *barred* holds a row of the same *conflict* value
    (whose column *barred_unless*, if named, is NULL). One
    statement: checking a cached parent key, and the bar, costs nothing
    more than the insert (one more index probe)."""
    stmt = _insert_into_parent_stmt(conn.dialect.name, table, tuple(values), conflict, parent, parent_fk, parent_key,
                                    barred, barred_unless)
    return conn.execute(stmt, {**values, "expected_parent_key": expected}).scalar()
