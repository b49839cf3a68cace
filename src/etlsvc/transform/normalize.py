"""Normalization: raw rows of a source → ``normalized_data``, in SQL.

Owns turning a source's field mapping into the parameters of ``sql/queries/normalize.sql``
(JSON paths into the raw record) and running it over a range of raw row ids. The same SQL
serves a load (the rows one batch just copied) and a replay (every raw row of a source).
"""

from __future__ import annotations

import contextlib
from functools import cache

import asyncpg

from etlsvc import db
from etlsvc.extract.contract import NORMALIZED_FIELDS, Reject, SourceConfig, SourceKind
from etlsvc.transform.rules import FieldCheck, Problem, Rule, default_type
from etlsvc.transform.validate import checks_of


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
    sql = _upsert_sql(kind.raw_table, distinct_keys, mine, values_sql(src))
    row = await conn.fetchrow(sql, src.name, kind.name, above, upto, skip or [],
                              *paths(src, kind), src.tags_separator)
    return row["inserted"], row["updated"]


async def unique_conflicts(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, *,
                           above: int, upto: int = db.MAX_ID, skip: list[int] | None = None,
                           mine: bool = False) -> dict[int, Problem]:
    """Raw rows ``above < id <= upto`` (not in ``skip``) whose value of a ``unique`` field
    another natural key of the source holds, by raw id. The caller skips them in the
    upsert."""
    checks = [c for c in checks_of(src).values() if c.rule.unique]
    mapped = src.fields.mapped()
    path = dict(zip(NORMALIZED_FIELDS, paths(src, kind)))
    found: dict[int, Problem] = {}
    for check in checks:
        sql = (db.query("normalize", "unique_conflicts").replace("{raw_table}", kind.raw_table)
               .replace("{column}", check.field).replace("{mine}", _MINE if mine else ""))
        for row in await conn.fetch(sql, src.name, above, upto, [*(skip or []), *found],
                                    path["source_id"], path[check.field]):
            found[row["id"]] = Problem("unique", check.field, mapped[check.field],
                                       row["value"],
                                       "is already held by another source_id of the source")
    return found


async def take_raw(conn: asyncpg.Connection, kind: SourceKind,
                   problems: dict[int, Problem]) -> list[Reject]:
    """Raw rows that turned out to be rejects once copied: out of the raw table (a reject
    is never in it), as rejects with their position and record."""
    taken = await conn.fetch(
        db.query("normalize", "take_raw").replace("{raw_table}", kind.raw_table)
        .replace("{stream_column}", kind.stream_column).replace("{position}", kind.position_sql),
        list(problems))
    return [Reject.of(row["stream"], row["position"], row["record"], problems[row["id"]])
            for row in sorted(taken, key=lambda r: r["id"])]


async def ensure_unique_indexes(conn: asyncpg.Connection, src: SourceConfig) -> None:
    """The index each ``unique`` field's check looks values up with (made on first use:
    which fields are unique is config, not schema)."""
    for check in checks_of(src).values():
        if check.rule.unique:
            # Another process may make it at the same moment.
            with contextlib.suppress(asyncpg.UniqueViolationError,
                                     asyncpg.DuplicateTableError):
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS normalized_data_{check.field}_md5_idx "
                    f"ON normalized_data (source, md5({check.field}))")


async def bump_version(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind) -> None:
    """Raise the data version of ``src`` (its rows changed in this transaction)."""
    await conn.execute(db.query("normalize", "bump_version"), src.name, kind.name)


def values_sql(src: SourceConfig) -> str:
    """The casts of title … event_time from the raw record, in normalize.sql's parameter
    order ($7 …), made by the compiled rules of each field (its column's default when the
    field is not mapped)."""
    checks = checks_of(src)
    return ",\n           ".join(
        (checks.get(field) or FieldCheck(field, default_type(field), Rule())).sql(f"${7 + j}")
        for j, field in enumerate(NORMALIZED_FIELDS[1:]))


@cache
def _upsert_sql(table: str, distinct_keys: bool, mine: bool, values: str) -> str:
    dedupe = ("", "") if distinct_keys else ("DISTINCT ON (key)", "ORDER BY key, id DESC")
    return (db.query("normalize", "upsert").replace("{raw_table}", table)
            .replace("{values}", values)
            .replace("{distinct}", dedupe[0]).replace("{order}", dedupe[1])
            .replace("{mine}", _MINE if mine else ""))


_MINE = "AND r.xmin = pg_current_xact_id()::xid"


async def next_raw_id(conn: asyncpg.Connection, raw_table: str) -> int:
    """A fresh value of the raw table's id sequence: rows copied after this call are above it."""
    return await conn.fetchval(db.query("normalize", "next_raw_id"), f"{raw_table}_id_seq")
