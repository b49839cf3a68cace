"""Normalization in SQL: raw rows of a source → ``normalized_data``.

Owns running the statements of ``sql/queries/normalize.sql`` over a range of raw row ids
(their parameters come from ``transform/mapping.py``): the upsert, the ``unique`` checks,
raw rows turned into rejects, the data version. A load (the rows one batch just copied), a
retry and a replay (every raw row of a source) run the same SQL; ``load/write.py`` is the
one place that puts these steps in order.
"""

from __future__ import annotations

import contextlib
from functools import cache

import asyncpg

from etlsvc import db
from etlsvc.contract import NORMALIZED_FIELDS, Problem, Reject, SourceConfig, SourceKind
from etlsvc.transform.mapping import paths, unique_fields, values_sql


async def upsert(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, *,
                 above: int, upto: int = db.MAX_ID, skip: list[int] | None = None,
                 distinct_keys: bool = False, this_transaction: bool = False) -> tuple[int, int]:
    """Normalize raw rows ``above < id <= upto`` of ``src``; return (inserted, updated).

    ``distinct_keys``: the caller knows no two of these rows share a natural key.
    ``this_transaction``: only the raw rows this transaction wrote (a batch's load). The
    data version is the caller's to raise (``bump_version``) when rows were written.
    """
    sql = _upsert_sql(kind.raw_table, distinct_keys, this_transaction,
                      values_sql(src, keep_absent=kind.changes), kind.changes)
    row = await conn.fetchrow(sql, src.name, kind.name, above, upto, skip or [],
                              *paths(src, kind), src.tags_separator)
    return row["inserted"], row["updated"]


async def delete_gone(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, *,
                      above: int, upto: int = db.MAX_ID, skip: list[int] | None = None,
                      this_transaction: bool = False) -> int:
    """A change kind's deletes among raw rows ``above < id <= upto``: the keys whose last
    change is a delete leave ``normalized_data``; returns how many rows did."""
    sql = _kind_sql("normalize", "delete_gone", kind).replace(
        "{this_transaction}", _THIS_TRANSACTION if this_transaction else "")
    return await conn.fetchval(sql, src.name, above, upto, skip or [], paths(src, kind)[0])


async def clear(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind,
                streams: list[str]) -> int:
    """A TRUNCATE: the source's normalized rows of ``streams`` leave; returns how many."""
    return await conn.fetchval(_kind_sql("cdc", "clear", kind), src.name, streams)


async def sweep(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, stream: str,
                snapshot: int, run_id: int) -> int:
    """A finished snapshot of ``stream``: the source's normalized rows of it that the
    snapshot did not read leave; returns how many."""
    return await conn.fetchval(_kind_sql("cdc", "sweep", kind), src.name, stream, snapshot,
                               run_id, paths(src, kind)[0])


async def detect_gone(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind,
                      run_id: int) -> tuple[int, int, int]:
    """``deletes = "detect"``: the source's keys run ``run_id`` did not read leave (none if
    they are over ``max_delete_fraction``); returns (gone, total, deleted)."""
    row = await conn.fetchrow(_kind_sql("normalize", "detect_gone", kind), src.name, run_id,
                              paths(src, kind)[0], src.max_delete_fraction)
    return row["gone"], row["total"], row["deleted"]


def _kind_sql(file: str, name: str, kind: SourceKind) -> str:
    return (db.query(file, name).replace("{raw_table}", kind.raw_table)
            .replace("{stream_column}", kind.stream_column))


async def unique_conflicts(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, *,
                           above: int, upto: int = db.MAX_ID, skip: list[int] | None = None,
                           this_transaction: bool = False) -> dict[int, Problem]:
    """Raw rows ``above < id <= upto`` (not in ``skip``) whose value of a ``unique`` field
    another natural key of the source holds, by raw id. The caller skips them in the
    upsert."""
    mapped = src.fields.mapped()
    path = dict(zip(NORMALIZED_FIELDS, paths(src, kind)))
    found: dict[int, Problem] = {}
    for field in unique_fields(src):
        sql = (db.query("normalize", "unique_conflicts").replace("{raw_table}", kind.raw_table)
               .replace("{column}", field)
               .replace("{this_transaction}", _THIS_TRANSACTION if this_transaction else ""))
        for row in await conn.fetch(sql, src.name, above, upto, [*(skip or []), *found],
                                    path["source_id"], path[field]):
            found[row["id"]] = Problem("unique", field, mapped[field], row["value"],
                                       "is already held by another source_id of the source")
    return found


async def as_rejects(conn: asyncpg.Connection, kind: SourceKind, problems: dict[int, Problem],
                     *, take: bool) -> dict[int, Reject]:
    """The raw rows ``problems`` names as rejects with their position and record, by raw id.
    ``take``: they leave the raw table (rows a load or retry just copied: a reject is never
    in it); otherwise they stay (a replay's rows, which it does not own)."""
    sql = (db.query("normalize", "take_raw" if take else "raw_as_rejects")
           .replace("{raw_table}", kind.raw_table)
           .replace("{stream_column}", kind.stream_column)
           .replace("{position}", kind.position_sql))
    rows = await conn.fetch(sql, list(problems))
    return {row["id"]: Reject.of(row["stream"], row["position"], row["record"],
                                 problems[row["id"]])
            for row in sorted(rows, key=lambda r: r["id"])}


async def copied_ids(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind,
                     above: int) -> list[int]:
    """The ids of the raw rows this transaction copied above ``above``, in copy order."""
    rows = await conn.fetch(db.query("normalize", "copied_ids")
                            .replace("{raw_table}", kind.raw_table), src.name, above)
    return [r["id"] for r in rows]


async def ensure_unique_indexes(conn: asyncpg.Connection, src: SourceConfig) -> None:
    """The index each ``unique`` field's check looks values up with (made on first use:
    which fields are unique is config, not schema)."""
    for field in unique_fields(src):
        # Another process may make it at the same moment.
        with contextlib.suppress(asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
            await conn.execute(db.query("normalize", "unique_index").replace("{column}", field))


async def bump_version(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind) -> None:
    """Raise the data version of ``src`` (its rows changed in this transaction)."""
    await conn.execute(db.query("normalize", "bump_version"), src.name, kind.name)


async def next_raw_id(conn: asyncpg.Connection, raw_table: str) -> int:
    """A fresh value of the raw table's id sequence: rows copied after this call are above it."""
    return await conn.fetchval(db.query("normalize", "next_raw_id"), f"{raw_table}_id_seq")


@cache
def _upsert_sql(table: str, distinct_keys: bool, this_transaction: bool, values: str,
                changes: bool) -> str:
    dedupe = ("", "") if distinct_keys else ("DISTINCT ON (key)", "ORDER BY key, id DESC")
    ops = (", r.op", ", op", "WHERE op <> 3") if changes else ("", "", "")
    return (db.query("normalize", "upsert").replace("{raw_table}", table)
            .replace("{values}", values)
            .replace("{op}", ops[0]).replace("{op_out}", ops[1]).replace("{live}", ops[2])
            .replace("{distinct}", dedupe[0]).replace("{order}", dedupe[1])
            .replace("{this_transaction}", _THIS_TRANSACTION if this_transaction else ""))


_THIS_TRANSACTION = "AND r.xmin = pg_current_xact_id()::xid"
