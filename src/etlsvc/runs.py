"""Runs: the ``etl_runs`` row of each run of a source, and the lock that makes it the only one.

Owns the per-source advisory lock (session level, held by the run's connection for the whole
run, so it also guards against other processes and replicas) and the run row's life cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from etlsvc import db
from etlsvc.errors import SourceBusy

COUNTERS = ("rows_read", "rows_valid", "rows_rejected", "rows_inserted", "rows_updated",
            "rows_unchanged", "bytes_read", "pages_read", "lines_read")


@contextlib.asynccontextmanager
async def source_lock(conn: asyncpg.Connection, source: str) -> AsyncIterator[None]:
    """Hold the source's advisory lock; SourceBusy (with the running run's id) if taken."""
    key = f"etlsvc:source:{source}"
    if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", key):
        # The holder creates its run row right after taking the lock: give it a moment.
        running = None
        for _ in range(40):
            running = await conn.fetchval(db.query("runs", "running"), source)
            if running is not None:
                break
            await asyncio.sleep(0.05)
        raise SourceBusy(source, running)
    try:
        yield
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)


async def start(conn: asyncpg.Connection, source: str, kind: str, trigger: str,
                full_refresh: bool) -> int:
    """Close runs a dead process left open, then create this run's row; return its id."""
    await conn.execute(db.query("runs", "abandon_stale"), source)
    return await conn.fetchval(db.query("runs", "start"), source, kind, trigger, full_refresh,
                               socket.gethostname(), os.getpid())


async def add(conn: asyncpg.Connection, run_id: int, counts: dict[str, int]) -> None:
    """Add one batch's counters (call inside the batch's transaction)."""
    await conn.execute(db.query("runs", "add"), run_id, *(counts.get(c, 0) for c in COUNTERS))


async def set_total(conn: asyncpg.Connection, run_id: int, total: int) -> None:
    """Record how many bytes the run has to read (for percent progress)."""
    await conn.execute(db.query("runs", "set_total"), run_id, total)


async def note(conn: asyncpg.Connection, run_id: int, notes: dict[str, Any]) -> None:
    """Merge ``notes`` (what the run reports beyond counters) into the run's row."""
    await conn.execute(db.query("runs", "note"), run_id, notes)


async def finish(conn: asyncpg.Connection, run_id: int, status: str,
                 error: str | None) -> dict[str, Any]:
    """Mark the run finished; return its row."""
    return dict(await conn.fetchrow(db.query("runs", "finish"), run_id, status, error))
