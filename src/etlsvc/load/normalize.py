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
                 distinct_keys: bool = False, this_transaction: bool = False,
                 read_point: str | None = None) -> tuple[int, int]:
    """Normalize raw rows ``above < id <= upto`` of ``src``; return (inserted, updated).

    ``distinct_keys``: the caller knows no two of these rows share a natural key.
    ``this_transaction``: only the raw rows this transaction wrote (a batch's load). The
    data version is the caller's to raise (``bump_version``) when rows were written.
    ``read_point``: a backfill's batch (``Batch.read_point``): a row whose live version it
    did not see is left alone (where the kind has versions).
    """
    seen = kind.seen_sql if read_point is not None else None
    sql = upsert_sql(kind, distinct_keys, this_transaction,
                     values_sql(src, keep_absent=kind.changes), seen)
    point = _read_point_arg(kind, read_point) if seen is not None else []
    row = await conn.fetchrow(sql, src.name, kind.name, above, upto, skip or [],
                              *paths(src, kind), src.tags_separator, *point)
    return row["inserted"], row["updated"]


async def drop_unseen(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, *,
                      above: int, read_point: str) -> int:
    """A backfill's batch, after its upsert: its raw rows left alone (the live row, or its
    delete, is newer than its read) leave the raw table, so that a replay cannot undo the
    newer change with them; returns how many did."""
    sql = drop_unseen_sql(kind)
    if sql is None:
        return 0
    status = await conn.execute(sql, src.name, above, paths(src, kind)[0],
                                *_read_point_arg(kind, read_point))
    return int(status.split()[-1])


def drop_unseen_sql(kind: SourceKind) -> str | None:
    """``drop_unseen`` of normalize.sql for the kind (None: it has no versions)."""
    if kind.seen_sql is None:
        return None
    seen = kind.seen_sql.replace("$15", "$4")
    return (kind_sql("normalize", "drop_unseen", kind)
            .replace("{seen_row}", _seen(seen, "n.source_version", kind.version_sql))
            .replace("{seen_tombstone}", _seen(seen, "t.source_version", kind.version_sql)))


def _seen(seen: str, version: str, new: str) -> str:
    """A kind's ``seen_sql`` of the live ``version``, against the backfilled row's ``new``."""
    return seen.replace("{v}", version).replace("{new}", new)


def _read_point_arg(kind: SourceKind, read_point: str | None) -> list[str | None]:
    """The read point as the statement's last argument, if the kind's test takes it."""
    return [read_point] if kind.seen_sql is not None and "$15" in kind.seen_sql else []


async def delete_gone(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, *,
                      above: int, upto: int = db.MAX_ID, skip: list[int] | None = None,
                      this_transaction: bool = False) -> int:
    """A change kind's deletes among raw rows ``above < id <= upto``: the keys whose last
    change is a delete leave ``normalized_data`` (their tombstones keep the delete's source
    version); returns how many rows did."""
    sql = kind_sql("normalize", "mark_gone", kind).replace(
        "{this_transaction}", _THIS_TRANSACTION if this_transaction else "")
    ids = await conn.fetchval(sql, src.name, above, upto, skip or [], paths(src, kind)[0])
    if ids:
        await conn.execute(db.query("normalize", "delete_ids"), ids)
    return len(ids)


async def clear(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind,
                streams: list[str]) -> int:
    """A TRUNCATE: the source's normalized rows of ``streams`` leave; returns how many."""
    return await conn.fetchval(kind_sql("cdc", "clear", kind), src.name, streams)


async def sweep(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, stream: str,
                snapshot: int, run_id: int) -> int:
    """A finished snapshot of ``stream``: the source's normalized rows of it that the
    snapshot did not read leave; returns how many."""
    await conn.execute(db.query("cdc", "sweep_plan"))
    return await conn.fetchval(kind_sql("cdc", "sweep", kind), src.name, stream, snapshot,
                               run_id, paths(src, kind)[0])


async def detect_gone(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind,
                      run_id: int) -> tuple[int, int, int]:
    """``deletes = "detect"``: the source's keys run ``run_id`` did not read leave (none if
    they are over ``max_delete_fraction``); returns (gone, total, deleted)."""
    row = await conn.fetchrow(kind_sql("normalize", "detect_gone", kind), src.name, run_id,
                              paths(src, kind)[0], src.max_delete_fraction)
    return row["gone"], row["total"], row["deleted"]


def kind_sql(file: str, name: str, kind: SourceKind) -> str:
    """A named statement with the kind's placeholders filled (``kind_sql_of``)."""
    return kind_sql_of(db.query(file, name), kind)


def kind_sql_of(statement: str, kind: SourceKind) -> str:
    """``statement`` with the kind's placeholders filled: its raw table, stream and
    position columns, source version, and a change kind's ``op`` (see normalize.sql)."""
    ops = (", r.op", ", op", "AND op <> 3") if kind.changes else ("", "", "")
    return (statement.replace("{raw_table}", kind.raw_table)
            .replace("{stream_column}", kind.stream_column)
            .replace("{position}", kind.position_sql).replace("{version}", kind.version_sql)
            .replace("{op}", ops[0]).replace("{op_out}", ops[1]).replace("{live}", ops[2]))


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
        sql = (kind_sql("normalize", "unique_conflicts", kind).replace("{column}", field)
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
    sql = kind_sql("normalize", "take_raw" if take else "raw_as_rejects", kind)
    rows = await conn.fetch(sql, list(problems))
    return {row["id"]: Reject.of(row["stream"], row["position"], row["record"],
                                 problems[row["id"]])
            for row in sorted(rows, key=lambda r: r["id"])}


async def copied_ids(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind,
                     above: int) -> list[int]:
    """The ids of the raw rows this transaction copied above ``above``, in copy order."""
    rows = await conn.fetch(kind_sql("normalize", "copied_ids", kind), src.name, above)
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
def upsert_sql(kind: SourceKind, distinct_keys: bool, this_transaction: bool, values: str,
               seen: str | None) -> str:
    """The upsert of normalize.sql for the kind; ``seen``: as a backfill's batch."""
    dedupe = ("", "") if distinct_keys else ("DISTINCT ON (key)", "ORDER BY key, id DESC")
    guard = tombstone = ""
    if seen is not None:
        guard = ("AND (n.source_version IS NULL OR " +
                 _seen(seen, "n.source_version", "EXCLUDED.source_version") + ")")
        tombstone = ("AND NOT EXISTS (SELECT 1 FROM data_tombstones t WHERE t.source = $1 "
                     "AND t.source_id = src.key AND t.source_version IS NOT NULL AND NOT " +
                     _seen(seen, "t.source_version", "src.version") + ")")
    return (kind_sql("normalize", "upsert", kind).replace("{values}", values)
            .replace("{distinct}", dedupe[0]).replace("{order}", dedupe[1])
            .replace("{guard}", guard).replace("{tombstone}", tombstone)
            .replace("{this_transaction}", _THIS_TRANSACTION if this_transaction else ""))


_THIS_TRANSACTION = "AND r.xmin = pg_current_xact_id()::xid"
