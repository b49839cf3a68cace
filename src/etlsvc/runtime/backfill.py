"""Backfills: a range of a source read again, as runs of its own, beside the live run.

Owns the ``etl_backfills`` row of each backfill and its life: made (or found again: the
same source and range go on where they were), run under the source's *backfill* lock (so
beside the live run, one backfill of a source at a time) with trigger ``backfill``, its
checkpoints under a key of its own (``SOURCE#backfill:ID``: the live cursor, files' offsets
and a change kind's slot or binlog position are never read or moved), progress written
beside its batches, cancel (looked at every second), and the service taking up a backfill
whose process died. What a range is belongs to the kind (``SourceKind.check_backfill``);
that a backfilled row never overwrites a newer live change is the upsert's rule
(``SourceKind.seen_sql``, ``load/normalize.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import structlog

from etlsvc import db
from etlsvc.config import Config, Source
from etlsvc.contract import Backfill
from etlsvc.db import Database
from etlsvc.errors import BackfillError, SourceBusy
from etlsvc.extract import kind_of
from etlsvc.runtime import pipeline, runs
from etlsvc.runtime.workers import Workers

log = structlog.get_logger()

#: Statuses of a backfill that is not over: "failed" goes on when asked again (same range).
OPEN = ("pending", "running")
#: Seconds between writes of a running backfill's progress.
PROGRESS_EVERY = 1.0


async def create(pool: asyncpg.Pool, src: Source, *, stream: str | None, start: str | None,
                 end: str | None) -> dict[str, Any]:
    """The backfill of ``src`` over this range: the one not finished (or failed) with the
    same range if there is one (it goes on from its checkpoints), else a new one.
    BackfillError if the kind has none, the range is not one, or another range of the
    source is pending or running."""
    kind = kind_of(src)
    if kind.backfill_range is None:
        raise BackfillError(f"source {src.name!r}: a {kind.name} source has no backfill",
                            "no_backfill")
    stream = kind.check_backfill(src, stream, start, end)
    same = (stream, start, end)
    async with pool.acquire() as conn, conn.transaction():
        # One at a time per source: two requests at once do not both make one.
        await conn.execute(db.query("backfills", "creating"), src.name)
        if (row := await conn.fetchrow(db.query("backfills", "open_of"), src.name)) is not None:
            if (row["stream"], row["range_from"], row["range_to"]) != same:
                raise BackfillError(
                    f"source {src.name!r}: backfill {row['id']} ({describe(row)}) is "
                    f"{row['status']}; cancel it (etlsvc backfill --cancel {row['id']}) or "
                    "let it finish first", "backfill_open")
            return view(row)
        last = await conn.fetchrow(db.query("backfills", "failed_same"), src.name, *same)
        if last is not None:
            return view(last)
        row = await conn.fetchrow(db.query("backfills", "create"), src.name, src.kind, *same)
    log.info("backfill made", source=src.name, backfill=row["id"], range=describe(row))
    return view(row)


async def run(database: Database, cfg: Config, src: Source, backfill_id: int,
              workers: Workers, on_progress: pipeline.ProgressCallback | None = None,
              on_claimed: Callable[[pipeline.ClaimedRun], None] | None = None
              ) -> dict[str, Any]:
    """Run the backfill to its end (or its cancel, or a failure); return its row.
    BackfillError if it is running elsewhere or is over already. ``on_claimed``: told of
    the run once it is claimed (the service counts it among its runs)."""
    pool = database.pool
    row = await pool.fetchrow(db.query("backfills", "get"), backfill_id)
    if row is None:
        raise BackfillError(f"no backfill {backfill_id}", "unknown_backfill")
    if row["status"] in ("succeeded", "cancelled"):
        raise BackfillError(f"backfill {backfill_id} is {row['status']} already",
                            "backfill_over")
    earlier = dict(await pool.fetchrow(db.query("backfills", "counts"), row["runs"]))
    bf = Backfill(row["id"], row["stream"], row["range_from"], row["range_to"])
    try:
        [claimed] = await pipeline.claim(database, [src], trigger="backfill",
                                         full_refresh=False, backfill=bf)
    except SourceBusy as exc:
        raise BackfillError(f"source {src.name!r}: a backfill is running already "
                            f"(run {exc.run_id})", "backfill_running") from None
    if on_claimed:
        on_claimed(claimed)
    await pool.execute(db.query("backfills", "started"), bf.id, claimed.id)
    log.info("backfill running", source=src.name, backfill=bf.id, run_id=claimed.id,
             range=describe(row))

    async def cancelled() -> bool:
        return bool(await pool.fetchval(db.query("backfills", "cancel_asked"), bf.id,
                                        timeout=5))

    claimed.cancelled = cancelled
    latest: list[pipeline.Progress] = []

    def progressed(progress: pipeline.Progress) -> None:
        latest[:] = [progress]
        if on_progress:
            on_progress(progress)

    sharing = asyncio.create_task(_share_progress(pool, bf.id, earlier, latest))
    try:
        result = await claimed.execute(cfg, workers, progressed)
    finally:
        sharing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sharing
    counts = {k: result.get(k, 0) for k in earlier}
    status = ("succeeded" if result["status"] == "succeeded" else
              "cancelled" if (result.get("error") or "").startswith("cancelled") else
              "failed")
    position = await _position(pool, claimed.checkpoint_key)
    done = await pool.fetchrow(db.query("backfills", "finished"), bf.id, status,
                               result.get("error"), _progress(earlier, counts, position,
                                                              status == "succeeded"))
    log.info("backfill finished", source=src.name, backfill=bf.id, status=status,
             error=result.get("error"))
    return view(done)


async def cancel(pool: asyncpg.Pool, backfill_id: int) -> dict[str, Any]:
    """Stop the backfill: one running ends within a second (its batch in flight rolls
    back), one nobody runs is cancelled now. BackfillError if it is over already."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(db.query("backfills", "get"), backfill_id)
        if row is None:
            raise BackfillError(f"no backfill {backfill_id}", "unknown_backfill")
        idle = await runs.try_lock(conn, row["source"], backfill=True)
        try:
            done = await conn.fetchrow(db.query("backfills", "cancel"), backfill_id, idle)
        finally:
            if idle:
                await runs.unlock(conn, row["source"], backfill=True)
    if done is None:
        raise BackfillError(f"backfill {backfill_id} is {row['status']} already",
                            "backfill_over")
    log.info("backfill cancel asked", backfill=backfill_id, source=row["source"],
             now=done["status"] == "cancelled")
    return view(done)


async def get(pool: asyncpg.Pool, backfill_id: int) -> dict[str, Any] | None:
    row = await pool.fetchrow(db.query("backfills", "get"), backfill_id)
    return None if row is None else view(row)


async def listing(pool: asyncpg.Pool, source: str | None, limit: int = 100
                  ) -> list[dict[str, Any]]:
    """The backfills (of ``source``), newest first."""
    return [view(r) for r in await pool.fetch(db.query("backfills", "list"), source, limit)]


async def open_ones(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """Backfills pending or running (perhaps in a process that is gone)."""
    return [view(r) for r in await pool.fetch(db.query("backfills", "open_all"))]


def view(row: Any) -> dict[str, Any]:
    """A backfill row as the CLI and the API show it."""
    out = dict(row)
    out["runs"] = list(out["runs"])
    out["range"] = describe(row)
    return out


def describe(row: Any) -> str:
    """A backfill's range in words: ``table orders, from 100 to 200``."""
    parts = [f"table {row['stream']}"] if row["stream"] else []
    if row["range_from"] is not None:
        parts.append(f"from {row['range_from']}")
    if row["range_to"] is not None:
        parts.append(f"to {row['range_to']}")
    return ", ".join(parts) or "the whole source"


def _progress(earlier: dict[str, int], counts: dict[str, int], position: dict[str, Any],
              finished: bool = False, bytes_total: int = 0) -> dict[str, Any]:
    """Where a backfill is: its counters over every run, where its last batch was read
    (the kind's ``at``) and the fraction done where the kind can say it (else, where the
    run knows the bytes it has to read, those read of them)."""
    out: dict[str, Any] = {k: earlier[k] + counts.get(k, 0) for k in earlier}
    if "at" in position:
        out["at"] = position["at"]
    if finished:
        out["fraction"] = 1.0
    elif position.get("fraction") is not None:
        out["fraction"] = round(float(position["fraction"]), 4)
    elif bytes_total:
        out["fraction"] = round(min(1.0, counts.get("bytes_read", 0) / bytes_total), 4)
    return out


async def _position(pool: asyncpg.Pool, key: str) -> dict[str, Any]:
    """The backfill's last checkpoint (the latest written of its streams)."""
    return await pool.fetchval(db.query("backfills", "last_checkpoint"), key) or {}


async def _share_progress(pool: asyncpg.Pool, backfill_id: int, earlier: dict[str, int],
                          latest: list[pipeline.Progress]) -> None:
    """Every PROGRESS_EVERY seconds until cancelled, write where the run is if it moved
    (best effort, as a run's notes: the database may be away, and the run deals with it)."""
    shown = b""
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        if not latest:
            continue
        progress = _progress(earlier, latest[0].counts, latest[0].position,
                             bytes_total=latest[0].bytes_total)
        encoded = msgspec.json.encode(progress)
        if encoded == shown:
            continue
        try:
            await pool.execute(db.query("backfills", "progress"), backfill_id, progress,
                               timeout=5)
            shown = encoded
        except Exception as exc:
            log.debug("backfill progress not written", backfill=backfill_id,
                      error=type(exc).__name__)
