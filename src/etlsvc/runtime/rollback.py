"""Rolling a source back: its rows made again what they were right after one of its runs.

Owns ``etlsvc rollback`` and ``POST /etl/rollback``. The moment to go back to is the
snapshot run N's finish was written at (``etl_runs.finished_snapshot``): it sees every batch
the run committed. The source's rows as that snapshot saw them are read from the current
rows and the kept versions (``sql/migrations/0016_versions.sql``), and the source is made
equal to them in one transaction: rows written since are deleted, rows changed since take
their old content and lineage back, rows deleted since come back with their ids. The
triggers record all of it as versions and in the change feed, like any write. The
checkpoints go back too, so that the next run reads again what was rolled back (unless
``keep_position``, or the kind cannot move its position back: a replication slot).

A rollback is a run of its own (trigger ``rollback``), under the source's lock and its
backfills' lock: refused while the source runs. A dry run counts and changes nothing.
Its SQL is in ``sql/queries/versions.sql``.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog

from etlsvc import db
from etlsvc.config import Source
from etlsvc.db import Database
from etlsvc.errors import EtlError, RollbackError
from etlsvc.extract import kind_of
from etlsvc.load import normalize
from etlsvc.load.write import add_counts
from etlsvc.runtime import runs

log = structlog.get_logger()


async def rollback(database: Database, src: Source, to_run: int, *,
                   keep_position: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Roll ``src`` back to its state right after run ``to_run``. Returns the counts
    (``deleted``, ``updated``, ``inserted``, ``checkpoints``) and, unless ``dry_run``, the
    rollback's finished run (``run``). RollbackError if it cannot be done as asked,
    SourceBusy while the source (or a backfill of it) runs."""
    kind = kind_of(src)
    if not keep_position and kind.no_rewind:
        raise RollbackError(f"source {src.name!r} ({kind.name}): {kind.no_rewind}; roll back "
                            "with keep_position (--keep-position) to keep reading from where "
                            "it is", "no_rewind")
    async with database.pool.acquire() as conn, runs.source_lock(conn, src.name):
        await runs.take_lock(conn, src.name, backfill=True)
        try:
            snapshot = await _moment(conn, src, to_run)
            if dry_run:
                tx = conn.transaction()
                await tx.start()
                try:
                    return {**await _counts(conn, src, snapshot), "dry_run": True}
                finally:
                    await tx.rollback()
            return await _roll_back(database, conn, src, to_run, snapshot, keep_position)
        finally:
            await runs.unlock(conn, src.name, backfill=True)


async def _moment(conn: asyncpg.Connection, src: Source, to_run: int) -> str:
    """The snapshot run ``to_run`` finished at, once sure the versions it needs are kept."""
    run = await conn.fetchrow(db.query("versions", "rollback_run"), to_run)
    if run is None or run["source"] != src.name:
        raise RollbackError(f"source {src.name!r} has no run {to_run}", "no_run")
    if run["status"] == "running":
        raise RollbackError(f"run {to_run} has not finished", "run_running")
    if run["snapshot"] is None:
        raise RollbackError(f"run {to_run} finished before versions were kept (or did not "
                            "finish cleanly): there is no moment to go back to", "no_moment")
    kept = await conn.fetchrow(db.query("versions", "kept_since"), src.name, run["snapshot"])
    if kept is not None and kept["keep_days"] == 0:
        raise RollbackError(f"source {src.name!r} keeps no versions (history_days = 0): it "
                            "cannot be rolled back", "no_history")
    if kept is not None and kept["purged"]:
        raise RollbackError(f"the versions of source {src.name!r} from run {to_run} were "
                            f"purged (history_days = {kept['keep_days']:g})", "purged")
    return run["snapshot"]


async def _counts(conn: asyncpg.Connection, src: Source, snapshot: str) -> dict[str, int]:
    await conn.execute(db.query("versions", "rollback_target"), src.name, snapshot)
    return dict(await conn.fetchrow(db.query("versions", "rollback_counts"), src.name))


async def _roll_back(database: Database, conn: asyncpg.Connection, src: Source, to_run: int,
                     snapshot: str, keep_position: bool) -> dict[str, Any]:
    kind = kind_of(src)
    run_id = await runs.start(conn, src.name, src.kind, "rollback", False,
                              database.reconnect_timeout)
    with structlog.contextvars.bound_contextvars(run_id=run_id, source=src.name):
        log.info("rollback started", to_run=to_run, keep_position=keep_position)
        counts: dict[str, int] = {}
        error = None
        try:
            async with conn.transaction():
                counts = await _counts(conn, src, snapshot)
                await conn.execute(db.query("versions", "rollback_delete"), src.name)
                await conn.execute(db.query("versions", "rollback_update"), src.name)
                await conn.execute(db.query("versions", "rollback_insert"))
                if counts["updated"] or counts["inserted"]:
                    await normalize.bump_version(conn, src, kind)
                counts["checkpoints"] = 0 if keep_position else await conn.fetchval(
                    db.query("versions", "rollback_checkpoints"), src.name, snapshot)
                await add_counts(conn, run_id, {"rows_deleted": counts["deleted"],
                                                "rows_updated": counts["updated"],
                                                "rows_inserted": counts["inserted"]})
        except (EtlError, OSError, asyncpg.PostgresError) as exc:
            error = f"rollback to run {to_run} failed, nothing was changed: {exc}"
        await runs.note(conn, run_id, {"rollback": {"to_run": to_run,
                                                    "keep_position": keep_position, **counts}})
        row = await runs.finish(conn, run_id, "failed" if error else "succeeded", error)
        (log.error if error else log.info)("rollback finished", status=row["status"],
                                           error=error, **counts)
        return {**counts, "run": row}

