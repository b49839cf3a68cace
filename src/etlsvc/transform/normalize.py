"""Normalization: raw rows of a source → ``normalized_data``, in SQL.

Owns turning a source's field mapping into the parameters of ``sql/queries/normalize.sql``
(JSON paths into the raw record) and running it over a range of raw row ids. The same SQL
serves a load (the rows one batch just copied) and a replay (every raw row of a source).
"""

from __future__ import annotations

from functools import cache

import asyncpg

from etlsvc import db
from etlsvc.extract.contract import NORMALIZED_FIELDS, SourceConfig, SourceKind


def paths(src: SourceConfig, kind: SourceKind) -> list[list[str] | None]:
    """JSON path of each normalized field in the raw record (dotted for JSON kinds)."""
    mapped = src.fields.mapped()
    out: list[list[str] | None] = []
    for field in NORMALIZED_FIELDS:
        name = mapped.get(field)
        if name is None:
            out.append(None)
        else:
            out.append([name] if kind.record == "columns" else name.split("."))
    return out


async def upsert(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, *,
                 above: int, upto: int = db.MAX_ID, skip: list[int] | None = None,
                 distinct_keys: bool = False, mine: bool = False) -> tuple[int, int]:
    """Normalize raw rows ``above < id <= upto`` of ``src``; return (inserted, updated).

    ``distinct_keys``: the caller knows no two of these rows share a natural key.
    ``mine``: only the raw rows this transaction wrote (a batch's load). The data version
    is the caller's to raise (``bump_version``) when rows were written.
    """
    sql = _upsert_sql(kind.raw_table, distinct_keys, mine)
    row = await conn.fetchrow(sql, src.name, kind.name, above, upto, skip or [],
                              *paths(src, kind), src.tags_separator)
    return row["inserted"], row["updated"]


async def bump_version(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind) -> None:
    """Raise the data version of ``src`` (its rows changed in this transaction)."""
    await conn.execute(db.query("normalize", "bump_version"), src.name, kind.name)


@cache
def _upsert_sql(table: str, distinct_keys: bool, mine: bool) -> str:
    dedupe = ("", "") if distinct_keys else ("DISTINCT ON (key)", "ORDER BY key, id DESC")
    return (db.query("normalize", "upsert").replace("{raw_table}", table)
            .replace("{distinct}", dedupe[0]).replace("{order}", dedupe[1])
            .replace("{mine}", "AND r.xmin = pg_current_xact_id()::xid" if mine else ""))


async def next_raw_id(conn: asyncpg.Connection, raw_table: str) -> int:
    """A fresh value of the raw table's id sequence: rows copied after this call are above it."""
    return await conn.fetchval(db.query("normalize", "next_raw_id"), f"{raw_table}_id_seq")
