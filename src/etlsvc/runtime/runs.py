"""Runs: the ``etl_runs`` row of each run of a source, and the lock that makes it the only one.

Owns the per-source advisory lock (session level, held by the run's connection for the whole
run, so it also guards against other processes and replicas), the run row's life cycle, its
heartbeat, and the sweep that marks runs ``interrupted`` when the process running them is
gone: a run whose source lock nobody holds, and whose process is known dead or has been
silent for longer than a reconnect can take.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import msgspec
import structlog

from etlsvc import db
from etlsvc.contract import SourceConfig
from etlsvc.errors import SourceBusy, TickTaken

log = structlog.get_logger()

#: Seconds between heartbeats of a running run.
HEARTBEAT = 5.0
#: Seconds between writes of a running run's outcomes so far.
NOTES_EVERY = 1.0
#: Seconds between sweeps of ``etlsvc serve``.
SWEEP_EVERY = 30.0
HOST = socket.gethostname()


def _key(source: str, backfill: bool) -> str:
    # A backfill has a lock of its own: it runs beside the source's live run, one at a time.
    return f"etlsvc:{'backfill' if backfill else 'source'}:{source}"


async def try_lock(conn: asyncpg.Connection, source: str, *, backfill: bool = False) -> bool:
    """Take the source's advisory lock (``backfill``: its backfills') if it is free."""
    return await db.try_lock(conn, _key(source, backfill))


async def unlock(conn: asyncpg.Connection, source: str, *, backfill: bool = False) -> None:
    await db.unlock(conn, _key(source, backfill))


async def take_lock(conn: asyncpg.Connection, source: str, *, backfill: bool = False) -> None:
    """Take the source's advisory lock (``backfill``: its backfills'), or raise SourceBusy
    with the id of the run holding it.

    A holder that has just taken the lock may not have written its run row yet, and one
    whose run was quick may have let go already: this waits up to 2 s for either, so that a
    busy source is reported with its run and a freed one is taken.
    """
    running = None
    for _ in range(40):
        if await try_lock(conn, source, backfill=backfill):
            return
        if (running := await conn.fetchval(db.query("runs", "running"), source,
                                           backfill)) is not None:
            break
        await asyncio.sleep(0.05)
    raise SourceBusy({source: running})


@contextlib.asynccontextmanager
async def source_lock(conn: asyncpg.Connection, source: str,
                      wait: float = 0.0) -> AsyncIterator[None]:
    """Hold the source's advisory lock, waiting up to ``wait`` seconds for it; SourceBusy
    (with the running run's id) if it stays taken."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        try:
            await take_lock(conn, source)
            break
        except SourceBusy:
            if asyncio.get_running_loop().time() >= deadline:
                raise
        await asyncio.sleep(0.1)
    try:
        yield
    finally:
        await unlock(conn, source)


def stale_after(reconnect_timeout: float) -> float:
    """Seconds without a heartbeat after which a run whose lock is free is presumed dead: a
    run waiting for the database to come back holds no lock and cannot beat, for up to
    ``reconnect_timeout`` seconds."""
    return reconnect_timeout + 2 * HEARTBEAT


async def start(conn: asyncpg.Connection, source: str, kind: str, trigger: str,
                full_refresh: bool, reconnect_timeout: float, tick_s: float = 0.0) -> int:
    """Create this run's row and return its id. Call while holding the source's lock (a
    backfill's: the source's backfill lock; its runs are apart from the live ones).

    A row left 'running' is interrupted first if its process is gone (same host, no such
    pid) or silent for longer than a reconnect can take; otherwise its process is waiting
    for the database to come back (which cost it the lock): SourceBusy.

    ``tick_s`` (scheduled runs): TickTaken if a scheduled run of the source started less
    than that long ago, so that a replica whose tick comes after a quick run has already
    let go of the lock does not run the source a second time.
    """
    if tick_s and (done := await conn.fetchval(db.query("runs", "this_tick"), source, tick_s)):
        raise TickTaken(source, done)
    for r in await conn.fetch(db.query("runs", "running_of"), source,
                              stale_after(reconnect_timeout), trigger == "backfill"):
        if not (r["stale"] or _process_gone(r["host"], r["pid"])):
            raise SourceBusy({source: r["id"]})
        await conn.execute(db.query("runs", "interrupt"), r["id"])
    return await conn.fetchval(db.query("runs", "start"), source, kind, trigger, full_refresh,
                               HOST, os.getpid())


async def resume(conn: asyncpg.Connection, run_id: int) -> dict[str, Any]:
    """After a reconnect: the run is running again (a sweep may have marked it interrupted
    while the database was away); return its row, whose counters are what was committed."""
    return dict(await conn.fetchrow(db.query("runs", "resume"), run_id))


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


async def heartbeat(pool: asyncpg.Pool, run_id: int) -> None:
    """Beat every ``HEARTBEAT`` seconds until cancelled (on the pool: the run's own
    connection is busy with its batches). Missed beats during an outage are harmless."""
    while True:
        await asyncio.sleep(HEARTBEAT)
        try:
            await pool.execute(db.query("runs", "heartbeat"), run_id, timeout=HEARTBEAT)
        except Exception as exc:  # the database is away: the run itself deals with that
            log.debug("heartbeat missed", run_id=run_id, error=type(exc).__name__)


async def share_notes(pool: asyncpg.Pool, run_id: int,
                      notes: Callable[[], dict[str, Any]]) -> None:
    """Every ``NOTES_EVERY`` seconds until cancelled, write ``notes()`` into the run's notes
    if it changed (on the pool, as the heartbeat), so that a run's outcomes so far show
    while it runs. Best effort: the run's finish writes them for good."""
    shown = b""
    while True:
        await asyncio.sleep(NOTES_EVERY)
        current = notes()
        encoded = msgspec.json.encode(current)
        if not current or encoded == shown:
            continue
        try:
            await pool.execute(db.query("runs", "note"), run_id, current, timeout=NOTES_EVERY)
            shown = encoded
        except Exception as exc:  # the database is away: the run itself deals with that
            log.debug("run notes not shared", run_id=run_id, error=type(exc).__name__)


async def stopped(pool: asyncpg.Pool, run_ids: list[int]) -> None:
    """Mark the runs this process cancelled at shutdown ``interrupted`` (best effort: if the
    database is away, the next start's sweep does it)."""
    try:
        await pool.execute(db.query("runs", "stopped"), run_ids, timeout=5)
    except Exception as exc:
        log.warning("could not mark runs cancelled at shutdown", runs=run_ids,
                    error=type(exc).__name__)


def _process_gone(host: str | None, pid: int | None) -> bool:
    if host != HOST or not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def sweep(pool: asyncpg.Pool, reconnect_timeout: float,
                own: set[int] = frozenset()) -> list[int]:
    """Mark ``interrupted`` every running run whose process is gone; return their ids.

    A run qualifies when nobody holds its source's lock (a backfill's: the source's backfill
    lock), so its connection is gone, and its
    process is known dead (same host, no such pid) or has been silent for longer than a
    reconnect can take. ``own`` are this process's runs, never swept.
    """
    swept = []
    for r in await pool.fetch(db.query("runs", "running_all"), stale_after(reconnect_timeout)):
        # A run of this host and pid that is not ours is an earlier process's with the same
        # pid: a restarted container, whose service is pid 1 again.
        earlier = r["host"] == HOST and r["pid"] == os.getpid()
        if r["id"] in own or not (r["stale"] or earlier or _process_gone(r["host"], r["pid"])):
            continue
        async with pool.acquire() as conn:
            if not await try_lock(conn, r["source"], backfill=r["backfill"]):
                continue
            try:
                if await conn.fetchval(db.query("runs", "interrupt"), r["id"]):
                    swept.append(r["id"])
            finally:
                await unlock(conn, r["source"], backfill=r["backfill"])
    if swept:
        log.warning("runs of processes that are gone marked interrupted", runs=swept)
    return swept


def error_rate_exceeded(src: SourceConfig, counts: dict[str, int]) -> str | None:
    """The failure message if more records were rejected than the source allows."""
    read, rejected = counts["rows_read"], counts["rows_rejected"]
    if read and rejected / read > src.max_error_rate:
        return (f"{rejected} of {read} records rejected ({rejected / read:.1%}), above the "
                f"source's max_error_rate of {src.max_error_rate:.1%}")
    return None
