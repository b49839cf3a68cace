"""Retention: raw rows and rejects older than a source's ``retention_days``, and versions
replaced longer ago than its ``history_days``, purged.

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


async def lock_raw(conn: asyncpg.Connection, source: str, *, wait: bool) -> bool:
    """The source's transaction-level raw lock, taken by a purge batch (if free) and by a
    replay (waits); whether it was taken."""
    return await db.xact_lock(conn, f"etlsvc:raw:{source}", wait=wait)


async def purge(pool: asyncpg.Pool, cfg: Config, sources: list[Source] | None = None, *,
                batch: int = BATCH, pause: float = PAUSE) -> dict[str, dict[str, int]]:
    """Purge each source with ``retention_days`` or ``history_days`` (all, or ``sources``);
    {source: {raw, rejects, versions}} deleted. Returns {} if another process is purging."""
    async with pool.acquire() as conn:
        if not await db.try_lock(conn, _LOCK):
            log.info("purge skipped: another process is purging")
            return {}
        try:
            done: dict[str, dict[str, int]] = {}
            for src in sources or cfg.sources:
                if src.retention_days is not None:
                    done[src.name] = await _purge_source(conn, src, batch, pause)
                if src.history_days:
                    done.setdefault(src.name, {})["versions"] = await _purge_versions(
                        conn, src, batch, pause)
            return done
        finally:
            await db.unlock(conn, _LOCK)


async def _purge_source(conn: asyncpg.Connection, src: Source, batch: int,
                        pause: float) -> dict[str, int]:
    assert src.retention_days is not None
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=src.retention_days)
    table = kind_of(src).raw_table
    counts = {"raw": 0, "rejects": 0, "postponed": 0}
    upto = await conn.fetchval(db.query("retention", "raw_upto").replace("{raw_table}", table),
                               cutoff)
    last = batches = 0
    while upto is not None and last < upto:
        async with conn.transaction():
            if not await lock_raw(conn, src.name, wait=False):   # a replay is under way
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


async def _purge_versions(conn: asyncpg.Connection, src: Source, batch: int,
                          pause: float) -> int:
    """The source's versions replaced more than ``history_days`` ago (and its checkpoints'),
    purged in batches; reads as of a moment before then answer 410 from now on."""
    assert src.history_days
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=src.history_days)
    purged = 0
    while True:
        deleted = await conn.fetchval(db.query("versions", "purge"), src.name, cutoff, batch)
        purged += deleted
        if deleted < batch:
            break
        await asyncio.sleep(pause)
    await conn.execute(db.query("versions", "purge_checkpoints"), src.name, cutoff)
    if purged:
        log.info("purged versions", source=src.name, versions=purged,
                 replaced_before=cutoff.isoformat())
    return purged


async def prune_tombstones(pool: asyncpg.Pool, retention_days: float) -> None:
    """Drop change-feed tombstones older than ``retention_days`` (``[server]
    tombstone_retention_days``: feed positions before them expire)."""
    await pool.execute(db.query("api", "prune_tombstones"),
                       dt.timedelta(days=retention_days))
