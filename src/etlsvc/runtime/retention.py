"""Retention: raw rows and rejects older than a source's ``retention_days``, purged.

Owns the maintenance job that ``etlsvc serve`` runs every ``server.maintenance_every_s``
(one replica at a time: an advisory lock) and ``etlsvc purge`` runs once. It deletes in
small batches, each its own short transaction with a pause after it, so the read API never
waits behind a long delete. A raw row that a normalized row still points at (its lineage:
``normalized_data.raw_table``/``raw_id``) is never deleted, whatever its age.

A replay re-points normalized rows at older raw rows, so a purge batch and a replay of the
same source never overlap: both take the source's transaction-level "raw" lock (a batch
only if it is free; the source is then skipped until the next pass).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import asyncpg
import structlog

from etlsvc import db
from etlsvc.config import Config, Source
from etlsvc.extract import kind_of

log = structlog.get_logger()

#: Rows deleted per transaction, and the pause after each (the read API goes between).
BATCH = 5000
PAUSE = 0.02
_LOCK = "etlsvc:maintenance"


def raw_lock_sql(blocking: bool) -> str:
    """The source's transaction-level raw lock (``$1``: the source), taken by a purge
    batch (``pg_try_…``) and by a replay (waits)."""
    fn = "pg_advisory_xact_lock" if blocking else "pg_try_advisory_xact_lock"
    return f"SELECT {fn}(hashtextextended('etlsvc:raw:' || $1, 0))"


async def purge(pool: asyncpg.Pool, cfg: Config, sources: list[Source] | None = None, *,
                batch: int = BATCH, pause: float = PAUSE) -> dict[str, dict[str, int]]:
    """Purge each source with ``retention_days`` (all, or ``sources``); {source: {raw,
    rejects}} deleted. Returns {} if another process is purging."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                                   _LOCK):
            log.info("purge skipped: another process is purging")
            return {}
        try:
            done = {}
            for src in sources or cfg.sources:
                if src.retention_days is not None:
                    done[src.name] = await _purge_source(conn, src, batch, pause)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", _LOCK)


async def _purge_source(conn: asyncpg.Connection, src: Source, batch: int,
                        pause: float) -> dict[str, int]:
    assert src.retention_days is not None
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=src.retention_days)
    table = kind_of(src).raw_table
    counts = {"raw": 0, "rejects": 0, "postponed": 0}
    upto = await conn.fetchval(db.query("retention", "raw_upto").replace("{raw_table}", table),
                               cutoff)
    last = batches = 0
    with_lock = raw_lock_sql(blocking=False)
    while upto is not None and last < upto:
        async with conn.transaction():
            if not await conn.fetchval(with_lock, src.name):   # a replay is under way
                counts["postponed"] = 1
                log.info("purge of raw rows postponed: the source is being replayed",
                         source=src.name)
                break
            row: Any = await conn.fetchrow(
                db.query("retention", "purge_raw").replace("{raw_table}", table),
                src.name, last, upto, cutoff, batch)
        if row["last"] is None:
            break
        last = row["last"]
        counts["raw"] += row["deleted"]
        batches += 1
        if batches % 100 == 0:          # progress on a long purge
            log.info("purging raw rows", source=src.name, deleted=counts["raw"],
                     at_id=last, up_to_id=upto)
        await asyncio.sleep(pause)
    while True:
        deleted = await conn.fetchval(db.query("retention", "purge_rejects"), src.name,
                                      cutoff, batch)
        counts["rejects"] += deleted
        if deleted < batch:
            break
        await asyncio.sleep(pause)
    log.info("purged", source=src.name, raw_rows=counts["raw"], rejects=counts["rejects"],
             older_than=cutoff.isoformat())
    return counts
