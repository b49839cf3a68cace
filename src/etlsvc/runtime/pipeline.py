"""One run of one source, the same for every kind: claim → batches → commit each → finish.

Owns a run's life cycle: taking the source's lock and run row (or SourceBusy), asking the
source's kind for its batches (``extract``), committing each through the one batch path
(``load/batches.py``) while the next is prepared, riding out a lost database (reconnect,
resume from the last committed batch), the run's error, notes and summary event. Owns no
SQL (``runtime/runs.py`` and ``load/`` run it) and no parsing (``extract/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from etlsvc import db, flow, metrics
from etlsvc.config import Config, Source
from etlsvc.contract import COUNTERS, Backfill, Extraction, Prepared
from etlsvc.db import Database
from etlsvc.errors import (
    DatabaseLost,
    EtlError,
    SourceBusy,
    SourceError,
    describe,
    one_line,
)
from etlsvc.extract import kind_of
from etlsvc.load import batches, checkpoint, normalize, shapes, write
from etlsvc.runtime import anomalies, notify, runs
from etlsvc.runtime.workers import Workers

log = structlog.get_logger()


#: Seconds between looks at whether a cancellable run (a backfill) was cancelled.
CANCEL_EVERY = 1.0
#: A run's notes keep the outcome of this many parts (files, pages, feeds) at most.
MAX_PARTS = 1000
PART_COUNTERS = ("batches", "rows_read", "rows_valid", "rows_rejected", "rows_inserted",
                 "rows_updated")


@dataclass
class Progress:
    """Counters of a run so far, passed to the progress callback after each batch."""

    run_id: int
    source: str
    bytes_total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    #: What the run reports beside an error (stored in the run's notes).
    warnings: list[str] = field(default_factory=list)
    #: What the source's kind reports (stored in the run's notes, e.g. each feed's outcome).
    notes: dict[str, Any] = field(default_factory=dict)
    #: The checkpoint state of the last batch committed (where the run is).
    position: dict[str, Any] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)

    def outcomes(self) -> dict[str, Any]:
        """The notes that show a run's outcomes so far (nothing before its first commit)."""
        parts = self.notes.get("parts")
        return {"parts": parts} if parts else {}

    def outcome(self, part: str, counts: dict[str, int]) -> None:
        """Add a committed batch's counters to its part's (each file, page or feed) in the
        notes' ``parts``; past ``MAX_PARTS`` parts, ``other_batches`` counts the batches of
        the parts not listed."""
        parts = self.notes.setdefault("parts", {})
        totals = parts.get(part)
        if totals is None:
            if len(parts) >= MAX_PARTS:
                self.notes["other_batches"] = self.notes.get("other_batches", 0) + 1
                return
            totals = parts[part] = dict.fromkeys(PART_COUNTERS, 0)
        totals["batches"] += 1
        for k in PART_COUNTERS[1:]:
            totals[k] += counts[k]


ProgressCallback = Callable[[Progress], None]


async def run_source(database: Database, cfg: Config, src: Source, workers: Workers, *,
                     trigger: str = "manual", full_refresh: bool = False,
                     on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run ``src`` once; return its finished ``etl_runs`` row. SourceBusy if already running."""
    [claimed] = await claim(database, [src], trigger=trigger, full_refresh=full_refresh)
    return await claimed.execute(cfg, workers, on_progress)


async def claim(database: Database, sources: list[Source], *, trigger: str,
                full_refresh: bool, tick_s: float = 0.0,
                backfill: Backfill | None = None) -> list[ClaimedRun]:
    """Take every source's lock and create their run rows, or none of them.

    SourceBusy, naming every source that is running, if any is (TickTaken: a scheduled run
    started less than ``tick_s`` ago); the runs have ids from here on, and
    ``ClaimedRun.execute`` does the work and lets go. ``backfill``: a backfill's run of its
    one source, under the source's backfill lock (beside a live run).
    """
    held: list[tuple[Source, asyncpg.Connection]] = []
    busy: dict[str, int | None] = {}
    try:
        for src in sources:
            conn = await database.pool.acquire()
            held.append((src, conn))
            try:
                await runs.take_lock(conn, src.name, backfill=backfill is not None)
            except SourceBusy as exc:
                held.pop()
                busy |= exc.running
                await database.pool.release(conn)
        if busy:
            raise SourceBusy(busy)
        return [ClaimedRun(await runs.start(conn, src.name, src.kind, trigger, full_refresh,
                                            database.reconnect_timeout, tick_s),
                           src, trigger, full_refresh, database, conn, backfill=backfill)
                for src, conn in held]
    except BaseException:
        for src, conn in held:
            await _release(database, src, conn, backfill is not None)
        raise


async def _release(database: Database, src: Source, conn: asyncpg.Connection,
                   backfill: bool) -> None:
    """Release the source's lock and the connection (a dead one is just dropped)."""
    with contextlib.suppress(*db.UNAVAILABLE):
        if not conn.is_closed():
            await runs.unlock(conn, src.name, backfill=backfill)
    with contextlib.suppress(*db.UNAVAILABLE):
        await database.pool.release(conn)


@dataclass
class ClaimedRun:
    """A run whose lock is held (by ``conn``) and whose ``etl_runs`` row exists."""

    id: int
    src: Source
    trigger: str
    full_refresh: bool
    database: Database
    conn: asyncpg.Connection
    #: Set when the service stops: a continuous source's run then ends its batches.
    stopping: asyncio.Event | None = None
    #: A backfill's run: its range, checkpoints of its own, its own lock.
    backfill: Backfill | None = None
    #: Polled every CANCEL_EVERY seconds while the run loads: True ends it (cancelled).
    cancelled: Callable[[], Awaitable[bool]] | None = None

    @property
    def checkpoint_key(self) -> str:
        """The key of the run's checkpoints: the source's, or its backfill's own."""
        return (f"{self.src.name}#backfill:{self.backfill.id}" if self.backfill else
                self.src.name)

    async def execute(self, cfg: Config, workers: Workers,
                      on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Load the source, finish the run row, release the lock; return the row."""
        try:
            return await _execute(cfg, self, workers, on_progress)
        finally:
            await _release(self.database, self.src, self.conn, self.backfill is not None)

    async def reconnect(self, deadline: float) -> dict[str, Any]:
        """A new connection holding the source's lock again, with backoff until ``deadline``
        (monotonic); return the run's row as committed. DatabaseLost past the deadline."""
        await _release(self.database, self.src, self.conn, self.backfill is not None)
        delay = 0.2
        while True:
            conn = None
            try:
                conn = await self.database.pool.acquire(timeout=5)
                await runs.take_lock(conn, self.src.name, backfill=self.backfill is not None)
                row = await runs.resume(conn, self.id)
                self.conn = conn
                return row
            except SourceBusy as exc:
                # Another process is claiming the source; it sees this run alive and backs off.
                problem: BaseException = exc
                await self.database.pool.release(conn)
            except Exception as exc:
                # The pool may hand out an idle connection the outage killed: the first
                # statement on it fails, and the next attempt gets a new one.
                if not db.unavailable(exc):
                    raise
                if conn is not None:
                    # asyncpg gives a pooled connection back by itself when the server
                    # closes it: then the proxy is detached and there is nothing to end.
                    with contextlib.suppress(asyncpg.InterfaceError):
                        conn.terminate()
                        await self.database.pool.release(conn)
                problem = DatabaseLost(f"database connection lost: {describe(exc)}")
            if time.monotonic() + delay > deadline:
                raise problem
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)


async def _execute(cfg: Config, run: ClaimedRun, workers: Workers,
                   on_progress: ProgressCallback | None) -> dict[str, Any]:
    src = run.src
    with structlog.contextvars.bound_contextvars(run_id=run.id, source=src.name):
        log.info("run started", trigger=run.trigger, full_refresh=run.full_refresh)
        progress = Progress(run.id, src.name)
        started = time.monotonic()
        beating = asyncio.create_task(runs.heartbeat(run.database.pool, run.id))
        sharing = asyncio.create_task(runs.share_notes(run.database.pool, run.id,
                                                       progress.outcomes))
        error = None
        try:
            if not await _load_unless_cancelled(cfg, run, workers, progress, on_progress):
                error = "cancelled by the operator (each batch committed before stays)"
        except (EtlError, OSError, UnicodeError) as exc:
            error = str(exc)
        except asyncpg.PostgresError as exc:      # a statement failed: say which error
            error = f"database error: {exc.sqlstate}: {exc}"
        except Exception as exc:  # a bug: the run fails, the service does not
            log.exception("run crashed")
            error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            beating.cancel()
            sharing.cancel()
        error = one_line(error) if error else runs.error_rate_exceeded(src, progress.counts)
        if error is None and src.deletes == "detect" and run.backfill is None:
            try:
                error = await _detect_deletes(run, progress)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                error = f"detecting deletes failed (nothing deleted): {describe(exc)}"
        row = await _finish(run, progress, error)
        seconds = time.monotonic() - started
        metrics.observe_run(row, seconds)
        # A backfill's run reads what its range holds: not comparable with the live runs.
        row["anomaly"] = None if run.backfill else await _compare_with_recent(run, row)
        _announce(cfg, run, row)
        (log.error if error else log.info)(
            "run finished", status=row["status"], error=error,
            duration_s=round(seconds, 3),
            rows_per_s=round(row["rows_read"] / seconds) if seconds else None,
            **{k: row[k] for k in COUNTERS})
        return row


async def _detect_deletes(run: ClaimedRun, progress: Progress) -> str | None:
    """After a whole, successful read: the keys it did not see leave (``deletes =
    "detect"``), with the run's counter, in one transaction; the error if too many would."""
    src = run.src
    async with run.conn.transaction():
        gone, total, deleted = await normalize.detect_gone(run.conn, src, kind_of(src), run.id)
        if deleted:
            await write.add_counts(run.conn, run.id, {"rows_deleted": deleted})
    progress.counts["rows_deleted"] += deleted
    if gone and not deleted:
        return (f"deletes = \"detect\": this read lacks {gone:,} of the source's {total:,} "
                f"rows ({gone / total:.0%}), over max_delete_fraction "
                f"({src.max_delete_fraction:g}), so none was deleted (a partial export?); "
                "raise max_delete_fraction if they really went")
    if deleted:
        log.info("keys gone from the source deleted", deleted=deleted, total=total)
    return None


async def _load_unless_cancelled(cfg: Config, run: ClaimedRun, workers: Workers,
                                 progress: Progress,
                                 on_progress: ProgressCallback | None) -> bool:
    """``_load``; False if the run was cancelled (``ClaimedRun.cancelled``) first: the
    batch committing then rolls back whole, as at a crash."""
    if run.cancelled is None:
        await _load(cfg, run, workers, progress, on_progress)
        return True
    loading = asyncio.create_task(_load(cfg, run, workers, progress, on_progress))
    try:
        while True:
            done, _ = await asyncio.wait([loading], timeout=CANCEL_EVERY)
            if done:
                loading.result()
                return True
            try:
                stop = await run.cancelled()
            except Exception as exc:      # the database is away: the load deals with that
                log.debug("could not look for a cancel", error=describe(exc))
                continue
            if stop:
                log.info("run cancelled by the operator")
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
                return False
    finally:
        if not loading.done():        # this task itself was cancelled (the service stops)
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading


async def _load(cfg: Config, run: ClaimedRun, workers: Workers, progress: Progress,
                on_progress: ProgressCallback | None) -> None:
    """Commit the source's batches; when the connection is lost, reconnect and go on from
    the last committed checkpoint (each batch commits whole, so nothing is loaded twice)."""
    deadline = committed = None
    while True:
        try:
            await db.commit_async(run.conn)
            await _commit_batches(cfg, run, workers, progress, on_progress)
            return
        except Exception as exc:
            if not await _connection_lost(run, exc):
                raise
            metrics.database_error("run")
            log.warning("database connection lost, reconnecting", error=describe(exc),
                        reconnect_timeout_s=run.database.reconnect_timeout)
            if deadline is None or committed != progress.counts:   # a new outage
                deadline = time.monotonic() + run.database.reconnect_timeout
            row = await run.reconnect(deadline)
            progress.counts = committed = {k: row[k] for k in COUNTERS}
            log.info("reconnected; resuming from the last committed batch",
                     rows_read=row["rows_read"])


async def _commit_batches(cfg: Config, run: ClaimedRun, workers: Workers, progress: Progress,
                          on_progress: ProgressCallback | None) -> None:
    """The kind's batches from the checkpoints on, each committed as it comes (the next one
    is prepared meanwhile)."""
    src, kind, conn = run.src, kind_of(run.src), run.conn
    await normalize.ensure_unique_indexes(conn, src)

    async def set_total(total: int) -> None:
        progress.bytes_total = total
        await runs.set_total(conn, progress.run_id, total)

    ex = Extraction(
        src, progress.run_id,
        await checkpoint.read(conn, run.checkpoint_key, run_id=progress.run_id,
                              # deletes = "detect" needs every key: read from the start
                              full_refresh=run.full_refresh or (
                                  src.deletes == "detect" and run.backfill is None)),
        cfg.resolve("."), workers,
        batches.Preparer(src, progress.run_id, await shapes.known(conn, src.name)), progress.warn,
        set_total, progress.notes, run.stopping, cfg.pipeline.parallel_streams, run.backfill)

    async def committed(batch: Prepared, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            progress.counts[k] += v
        progress.outcome(batch.part, counts)
        progress.position = batch.state
        for change in batch.drift:
            seen = progress.notes.setdefault("drift", [])
            if change not in seen:            # each change once per run
                seen.append(change)
                metrics.DRIFT.labels(src.name, change["change"]).inc()
                log.warning("schema drift", policy=src.schema_drift, **change)
        if batch.after_commit:
            try:
                await batch.after_commit()
            except Exception as exc:      # redelivered later, and recognised then
                log.warning("could not acknowledge a committed batch", error=describe(exc))
        if on_progress:
            on_progress(progress)

    committer = batches.Committer(run.database, conn, src, kind, progress.run_id,
                                  cfg.pipeline.connections_per_run, committed,
                                  run.checkpoint_key)
    try:
        async for batch in flow.prefetch(kind.batches(ex)):
            await committer.submit(batch)
    finally:
        await committer.close()


async def _connection_lost(run: ClaimedRun, exc: Exception) -> bool:
    """Whether ``exc`` means the run's connection is gone (not a file or upstream error)."""
    if isinstance(exc, EtlError) or not db.unavailable(exc):
        return False
    if isinstance(exc, asyncpg.PostgresError) or _closed_connection(exc):
        return True
    # An OSError: from the database, or from a file? An InterfaceError: a dead connection,
    # or a statement given the wrong arguments (a bug: reconnecting would not help)?
    try:
        return run.conn.is_closed() or not await db.responds(run.conn, within=5)
    except asyncpg.InterfaceError:      # the pool took the connection back: it died
        return True


def _closed_connection(exc: BaseException) -> bool:
    """Whether asyncpg said, here or in what led to it, that a connection is closed. A
    batch's own connection may be the one that died while the run's still answers: the
    backends of a killed postmaster live on for a moment."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, asyncpg.ConnectionDoesNotExistError) or (
                isinstance(seen, asyncpg.InterfaceError) and "connection is closed" in str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _finish(run: ClaimedRun, progress: Progress,
                  error: str | None) -> dict[str, Any]:
    """Mark the run finished. If the database is away, wait for it as a batch would; if it
    does not come back, the row is left to the sweep (it marks it interrupted) and the
    caller gets the run as this process knows it."""
    status = "failed" if error else "succeeded"

    async def close() -> dict[str, Any]:
        notes = {**progress.notes, "warnings": progress.warnings} if progress.warnings else \
            progress.notes
        if notes:
            await runs.note(run.conn, run.id, notes)
        return await runs.finish(run.conn, run.id, status, error)

    try:
        try:
            return await close()
        except Exception as exc:
            if not db.unavailable(exc):
                raise
            deadline = time.monotonic() + (0 if isinstance(error, str) and error.startswith(
                "database connection lost") else run.database.reconnect_timeout)
            await run.reconnect(deadline)
            return await close()
    except (DatabaseLost, SourceBusy, *db.UNAVAILABLE) as exc:
        log.error("could not mark the run finished: the database is away", error=str(exc))
        return {"id": run.id, "source": run.src.name, "kind": run.src.kind, "status": status,
                "error": error, **progress.counts}


async def _compare_with_recent(run: ClaimedRun, row: dict[str, Any]) -> dict[str, Any] | None:
    """Compare the finished run with the source's recent runs; flag it if it is unlike them."""
    try:
        anomaly = await anomalies.check(run.conn, run.src.anomaly, row)
    except Exception as exc:          # the database went away: the run is done regardless
        log.warning("could not compare the run with recent runs", error=describe(exc))
        return None
    if anomaly:
        for metric in anomaly:
            metrics.ANOMALIES.labels(run.src.name, metric).inc()
        log.warning("anomalous run", anomaly=anomaly)
    return anomaly


def _announce(cfg: Config, run: ClaimedRun, row: dict[str, Any]) -> None:
    """Notify of a failed or anomalous run (runtime/notify.py)."""
    name, pool = run.src.name, run.database.pool
    counts = {k: row.get(k) for k in COUNTERS}
    if row["status"] == "failed":
        notify.emit(pool, cfg.notify, "run_failed", name,
                    f"{name}: run {run.id} failed: {row.get('error')}", run_id=run.id,
                    details={"error": row.get("error"), "trigger": run.trigger, **counts})
    if changes := (row.get("notes") or {}).get("drift"):
        listed = "; ".join(f"{c['change']} column {c['column']!r} in {c['stream']}"
                           for c in changes[:5]) + (" …" if len(changes) > 5 else "")
        notify.emit(pool, cfg.notify, "drift", name,
                    f"{name}: schema drift in run {run.id} (schema_drift = "
                    f"{run.src.schema_drift!r}): {listed}", run_id=run.id,
                    details={"policy": run.src.schema_drift, "changes": changes})
    if row.get("anomaly"):
        metrics_text = ", ".join(f"{m} {a['value']} (usually {a['median']})"
                                 for m, a in row["anomaly"].items())
        notify.emit(pool, cfg.notify, "anomaly", name,
                    f"{name}: run {run.id} is unlike its recent runs: {metrics_text}",
                    run_id=run.id, details={"anomaly": row["anomaly"], **counts})


async def check_source(cfg: Config, src: Source) -> str:
    """What ``etlsvc check`` says of a source; SourceError if it cannot be read or mapped
    (whatever a driver raised, in one line)."""
    try:
        return await kind_of(src).check(src, cfg.resolve("."))
    except EtlError:
        raise
    except Exception as exc:
        raise SourceError(src.name, describe(exc)) from exc
