"""Reprocessing rejects: open rejects validated again under the current rules and mapping.

Owns ``etlsvc rejects retry`` / ``POST /etl/rejects/retry`` and ``… ignore``. A retry is a run
of its own (trigger ``retry``) that takes the source's lock like any run, then works through
the open rejects in chunks. Each chunk is one transaction: its rejects are locked (``FOR
UPDATE SKIP LOCKED``), validated by the source's :class:`~etlsvc.load.batches.Preparer`,
and the valid ones take the one write path of a batch (``load/write.write``: COPY into the
raw table, the unique check, the normalization upsert, the data version), then the run's
counters, while their rejects become ``resolved`` (with the retry's run id) in the same
commit. A reject is therefore loaded exactly once, even when
two retries race: the second waits for the lock and finds it resolved. The ones still
invalid stay ``open`` with the reason the current rules give.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
import structlog

from etlsvc import db
from etlsvc.config import Source
from etlsvc.contract import COUNTERS, Batch, Problem, Reject
from etlsvc.db import Database
from etlsvc.errors import EtlError
from etlsvc.extract import kind_of
from etlsvc.extract.records import project
from etlsvc.load.batches import Preparer
from etlsvc.load.write import Copied, add_counts, write
from etlsvc.runtime import runs

log = structlog.get_logger()

#: Rejects retried per transaction.
CHUNK = 1000
#: Seconds a retry waits for the source's lock (a run or another retry holds it).
LOCK_WAIT = 30.0


async def retry(database: Database, src: Source, *, run_id: int | None = None,
                ids: list[int] | None = None, chunk: int = CHUNK) -> dict[str, Any]:
    """Retry the open rejects of ``src`` (of one run, or the given ids); return the retry
    run's row (``rows_valid``: loaded now; ``rows_rejected``: still open)."""
    async with database.pool.acquire() as conn, runs.source_lock(conn, src.name,
                                                                 wait=LOCK_WAIT):
        retry_id = await runs.start(conn, src.name, src.kind, "retry", False,
                                    database.reconnect_timeout)
        with structlog.contextvars.bound_contextvars(run_id=retry_id, source=src.name):
            log.info("retry of rejects started", of_run=run_id, ids=ids)
            error = None
            after = 0
            try:
                while True:
                    async def one_chunk(after: int = after) -> list[asyncpg.Record]:
                        async with conn.transaction():
                            taken = await conn.fetch(db.query("rejects", "take_open"),
                                                     src.name, after, chunk, run_id, ids)
                            if taken:
                                await _retry_chunk(conn, src, retry_id, taken)
                            return taken

                    taken = await db.again_if_transient(one_chunk, "a chunk of the retry")
                    if not taken:
                        break
                    after = taken[-1]["id"]
            except (EtlError, asyncpg.PostgresError, OSError) as exc:
                error = f"retry stopped: {exc}"
            row = await runs.finish(conn, retry_id, "failed" if error else "succeeded", error)
            (log.error if error else log.info)(
                "retry of rejects finished", status=row["status"], error=error,
                loaded=row["rows_valid"], still_open=row["rows_rejected"])
            return row


async def _retry_chunk(conn: asyncpg.Connection, src: Source, retry_id: int,
                       taken: list[Any]) -> None:
    preparer = Preparer(src, retry_id)
    groups, unusable = _batches(src, taken)
    counts = dict.fromkeys(COUNTERS, 0)
    counts["rows_read"] = counts["rows_rejected"] = len(unusable)
    for ids, batch in groups:
        bad = preparer.check(batch)      # its columns are the mapped ones: none missing
        prepared = preparer.prepare(batch, bad)
        for i, problem in bad.items():
            await _still_open(conn, ids[i], problem)
        good = [reject_id for i, reject_id in enumerate(ids) if i not in bad]
        written = await write(conn, src, kind_of(src), retry_id,
                              Copied(prepared.payload, len(good)), rejects=None)
        # A conflict is the reject it came from, still open with the unique rule's reason.
        conflicted = set()
        for conflict in written.conflicts:
            assert conflict.index is not None
            conflicted.add(conflict.index)
            await _still_open(conn, good[conflict.index], conflict.reject)
        loaded = [r for i, r in enumerate(good) if i not in conflicted]
        if loaded:
            await conn.execute(db.query("rejects", "resolve"), loaded, retry_id)
        for k, v in (("rows_read", len(ids)), ("rows_valid", len(loaded)),
                     ("rows_rejected", len(ids) - len(loaded)),
                     ("rows_inserted", written.inserted), ("rows_updated", written.updated),
                     ("rows_unchanged", len(loaded) - written.inserted - written.updated)):
            counts[k] += v
    await add_counts(conn, retry_id, counts)


async def _still_open(conn: asyncpg.Connection, reject_id: int, p: Problem | Reject) -> None:
    await conn.execute(db.query("rejects", "still_open"), reject_id, p.reason, p.rule,
                       p.field, p.column, None if p.value is None else str(p.value))


def _batches(src: Source, taken: list[Any]) -> tuple[list[tuple[list[int], Batch]], list[int]]:
    """The taken rejects as batches (one per stream) with their reject ids, and the ids of
    rejects that cannot make a record: one that never parsed as a record (a malformed CSV
    line keeps only its text), or a flat record without a mapped column. Those keep their
    reason and stay open."""
    kind = kind_of(src)
    flat = kind.record == "columns"
    paths = list(dict.fromkeys(src.fields.mapped().values()))
    groups: dict[str, list[Any]] = {}
    unusable: list[int] = []
    for r in taken:
        record, position = r["record"], r["position"]
        if (not isinstance(record, dict)
                or not all(isinstance(position.get(k), int) for k in kind.position_keys)
                or (flat and not all(p in record for p in paths))):
            unusable.append(r["id"])
            continue
        groups.setdefault(r["stream"], []).append(r)
    out = []
    for stream, group in groups.items():
        records = [r["record"] for r in group]
        # The record as the raw table holds it: a CSV row's {column: value} is JSON too.
        out.append(([r["id"] for r in group],
                    Batch(stream, paths, project(records, paths, flat=flat),
                          [tuple(r["position"][k] for k in kind.position_keys) for r in group],
                          [msgspec.json.encode(rec) for rec in records],
                          rows_read=len(group))))
    return out, unusable


async def ignore(database: Database, src: Source, *, run_id: int | None = None,
                 ids: list[int] | None = None) -> int:
    """Mark the open rejects of ``src`` (of one run, or the given ids) ignored; how many."""
    status = await database.pool.execute(db.query("rejects", "ignore"), src.name, run_id, ids)
    return int(status.split()[-1])
