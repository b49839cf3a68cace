"""The long-running service: scheduled and requested runs on the application's event loop.

Owns the APScheduler 3 ``AsyncIOScheduler`` (one job per source with a ``schedule``:
coalescing, one instance at a time, a misfire grace), starting runs in the background for
``POST /etl/run``, and a graceful stop: no new runs, then the running ones get a grace period
to finish (each batch commits or rolls back as a whole), then they are cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from etlsvc import db, metrics
from etlsvc.config import Config, Source
from etlsvc.db import Database
from etlsvc.errors import BackfillError, SourceBusy, TickTaken
from etlsvc.extract import kind_of
from etlsvc.runtime import backfill, notify, pipeline, retention, runs
from etlsvc.runtime.workers import Workers
from etlsvc.schedule import MISFIRE_GRACE_S, parse_schedule, schedule_seconds, tick_window

log = structlog.get_logger()

#: Seconds between attempts to take a continuous source another replica holds.
FOLLOW_RETRY = 5.0
def stale(src: Source, last_success: dt.datetime | None, now: dt.datetime) -> bool:
    """A scheduled source whose last success is older than three of its periods."""
    if not src.schedule or last_success is None:
        return False
    return (now - last_success).total_seconds() > 3 * schedule_seconds(src.schedule)


class LoopMonitor:
    """How late the event loop runs a timer: its worst stall in the last minute, in ms."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=600)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="loop monitor")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - before - self.interval)
            self.samples.append((loop.time(), lag))
            metrics.LOOP_LAG.observe(lag)

    def worst_ms(self, window: float = 60.0) -> float:
        now = asyncio.get_running_loop().time()
        return round(1000 * max((lag for t, lag in self.samples if now - t <= window),
                                default=0.0), 3)

    def stop(self) -> None:
        if self._task:
            self._task.cancel()


class Running(NamedTuple):
    """A run of this process: the task executing it, and its claim (lock and row)."""

    task: asyncio.Task[None]
    claimed: pipeline.ClaimedRun


@dataclass
class Service:
    """Runs of this process: scheduled ones and requested ones."""

    cfg: Config
    database: Database
    #: The worker processes every run of this service parses in.
    workers: Workers
    scheduler: AsyncIOScheduler | None = None
    #: This process's runs by id: the task executing each, and its claim.
    running: dict[int, Running] = field(default_factory=dict)
    accepting: bool = True
    loop_monitor: LoopMonitor = field(default_factory=LoopMonitor)
    _sweeper: asyncio.Task[None] | None = None
    #: Claims under way (start_runs): stop() waits for them to register their runs.
    _claims: set[asyncio.Future[list[int]]] = field(default_factory=set)
    #: Set at stop: the runs of continuous sources end their batches.
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _followers: list[asyncio.Task[None]] = field(default_factory=list)
    #: This process's backfills by id (their runs are in ``running`` once claimed).
    _backfills: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    def start_scheduler(self) -> None:
        """Add a job per scheduled source and start the scheduler on the running loop."""
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        for src in self.cfg.sources:
            if src.schedule:
                self.scheduler.add_job(
                    self.scheduled_run, parse_schedule(src.schedule), args=[src.name],
                    id=src.name, name=f"run {src.name}", coalesce=True, max_instances=1,
                    misfire_grace_time=MISFIRE_GRACE_S, replace_existing=True)
        if any(src.retention_days is not None or src.history_days
               for src in self.cfg.sources):
            self.scheduler.add_job(
                self.maintain, IntervalTrigger(seconds=self.cfg.server.maintenance_every_s),
                id="maintenance", name="purge old raw rows, rejects and versions",
                coalesce=True,
                max_instances=1, next_run_time=dt.datetime.now(dt.UTC) + dt.timedelta(
                    seconds=min(60.0, self.cfg.server.maintenance_every_s)))
        self.scheduler.start()
        for src in self.cfg.sources:
            if kind_of(src).continuous:
                self._followers.append(asyncio.create_task(self.follow(src),
                                                           name=f"follow {src.name}"))
        self.loop_monitor.start()
        self._sweeper = asyncio.create_task(self.sweep_forever(), name="run sweeper")
        log.info("scheduler started", jobs=[j.id for j in self.scheduler.get_jobs()])

    @property
    def scheduler_running(self) -> bool:
        return bool(self.scheduler and self.scheduler.running)

    def next_run_at(self, name: str) -> dt.datetime | None:
        """When the scheduler next runs the source (None: not scheduled here)."""
        job = self.scheduler.get_job(name) if self.scheduler else None
        return job.next_run_time if job else None

    async def scheduled_run(self, name: str) -> None:
        """A scheduler tick: run the source unless another worker is running it."""
        if not self.accepting:
            return
        src = self.cfg.source(name)
        try:
            [run_id] = await self.start_runs([src], trigger="schedule",
                                             tick_s=tick_window(src.schedule))
        except TickTaken as exc:
            log.info("scheduled run skipped: another replica ran it at this tick", source=name,
                     run_id=exc.run_id)
            return
        except SourceBusy as exc:
            log.info("scheduled run skipped: the source is running elsewhere", source=name,
                     running_run_id=exc.run_id)
            return
        except Exception as exc:
            if not db.unavailable(exc):
                raise
            metrics.database_error("scheduler")
            log.warning("scheduled run skipped: the database is not available", source=name,
                        error=type(exc).__name__)
            return
        here = self.running.get(run_id)
        if here:             # the job lasts as long as the run: max_instances=1 then holds
            await asyncio.shield(here.task)

    async def follow(self, src: Source) -> None:
        """Keep a run of a continuous source going until the service stops: claim it
        (waiting while another replica holds it), execute it, and after a failure start
        again with backoff."""
        delay = 1.0
        failing: str | None = None          # the error of the failed runs in a row
        while self.accepting:
            try:
                [claimed] = await pipeline.claim(self.database, [src], trigger="stream",
                                                 full_refresh=False)
            except SourceBusy:                # another replica consumes it: stand by
                await asyncio.sleep(FOLLOW_RETRY)
                continue
            except Exception as exc:
                if not db.unavailable(exc):
                    raise
                await asyncio.sleep(FOLLOW_RETRY)
                continue
            claimed.stopping = self._stopping
            me = asyncio.current_task()
            assert me is not None
            self.running[claimed.id] = Running(me, claimed)
            try:
                row = await claimed.execute(self.cfg, self.workers)
            finally:
                self.running.pop(claimed.id, None)
            if row["status"] != "failed":
                if failing:
                    log.info("stream source running again", source=src.name)
                delay, failing = 1.0, None
            elif self.accepting:
                # One line when the reason changes, not one per attempt (the run's own
                # "run finished" line says each).
                if row["error"] != failing:
                    log.warning("stream run failed; starting again with backoff",
                                source=src.name, error=row["error"], delay_s=delay)
                failing = row["error"]
                await asyncio.sleep(delay)
                delay = min(2 * delay, 60.0)

    async def start_runs(self, sources: list[Source], *, trigger: str = "manual",
                         full_refresh: bool = False, tick_s: float = 0.0) -> list[int]:
        """Claim a run of every source (or of none: SourceBusy names each busy one) and
        execute them in the background; return their ids. ``tick_s``: see ``runs.start``."""
        if not self.accepting:
            raise SourceBusy(dict.fromkeys((s.name for s in sources), None))
        # This process's own runs, even while one waits for a lost database (its lock is
        # gone with the connection, so the database cannot tell).
        here = {r.claimed.src.name: i for i, r in self.running.items()
                if r.claimed.backfill is None}
        if busy := {s.name: here[s.name] for s in sources if s.name in here}:
            raise SourceBusy(busy)
        # stop() waits for claims under way: once one is done, its runs are registered.
        claim = asyncio.ensure_future(self._claim(sources, trigger, full_refresh, tick_s))
        self._claims.add(claim)
        claim.add_done_callback(self._claimed)
        # Shielded: a caller cancelled mid-claim (the scheduler's shutdown cancels its jobs)
        # would otherwise cancel the claim too, and one cancelled just after its run row was
        # written left that row 'running', its run never executed.
        return await asyncio.shield(claim)

    def _claimed(self, claim: asyncio.Future[list[int]]) -> None:
        self._claims.discard(claim)
        if not claim.cancelled():
            # Retrieved here: a caller cancelled mid-claim no longer awaits it, and asyncio
            # would log its SourceBusy as "Task exception was never retrieved".
            claim.exception()

    async def _claim(self, sources: list[Source], trigger: str, full_refresh: bool,
                     tick_s: float) -> list[int]:
        claimed = await pipeline.claim(self.database, sources, trigger=trigger,
                                       full_refresh=full_refresh, tick_s=tick_s)
        for run in claimed:
            task = asyncio.create_task(self._execute(run), name=f"run {run.id}")
            self.running[run.id] = Running(task, run)
            task.add_done_callback(self._forget(run.id))
        return [run.id for run in claimed]

    def _forget(self, run_id: int) -> Any:
        def forget(_: object) -> None:
            self.running.pop(run_id, None)

        return forget

    async def _execute(self, claimed: pipeline.ClaimedRun) -> None:
        try:
            await claimed.execute(self.cfg, self.workers)
        except asyncio.CancelledError:
            log.warning("run cancelled at shutdown; its last batch rolled back", run_id=claimed.id)
            raise
        except Exception:    # never "Task exception was never retrieved"
            log.exception("run failed outside its own error handling", run_id=claimed.id)

    def start_backfill(self, src: Source, backfill_id: int) -> None:
        """Run the backfill in the background (nothing if it runs elsewhere already)."""
        if not self.accepting or backfill_id in self._backfills:
            return
        task = asyncio.create_task(self._backfill(src, backfill_id),
                                   name=f"backfill {backfill_id}")
        self._backfills[backfill_id] = task
        task.add_done_callback(lambda _: self._backfills.pop(backfill_id, None))

    async def _backfill(self, src: Source, backfill_id: int) -> None:
        me = asyncio.current_task()
        assert me is not None
        claimed: list[int] = []

        def register(run: pipeline.ClaimedRun) -> None:
            claimed.append(run.id)
            self.running[run.id] = Running(me, run)

        try:
            await backfill.run(self.database, self.cfg, src, backfill_id, self.workers,
                               on_claimed=register)
        except BackfillError as exc:    # running elsewhere, or over: nothing to do here
            log.info("backfill not taken up here", backfill=backfill_id, reason=str(exc))
        except asyncio.CancelledError:
            log.warning("backfill stopped with the service; the next start goes on with it",
                        backfill=backfill_id)
            raise
        except Exception as exc:
            if not db.unavailable(exc):
                log.exception("backfill failed outside its own error handling",
                              backfill=backfill_id)
        finally:
            for run_id in claimed:
                self.running.pop(run_id, None)

    async def take_up_backfills(self) -> None:
        """Start the backfills left pending or running by a process that is gone (each
        resumes from its checkpoints); one running elsewhere is left to it."""
        names = {s.name: s for s in self.cfg.sources}
        for row in await backfill.open_ones(self.database.pool):
            if row["source"] in names and row["id"] not in self._backfills:
                self.start_backfill(names[row["source"]], row["id"])

    async def sweep_forever(self, every: float = runs.SWEEP_EVERY) -> None:
        """Mark runs of processes that are gone ``interrupted`` and prune the change feed's
        old tombstones: now, then periodically."""
        while True:
            try:
                await runs.sweep(self.database.pool, self.database.reconnect_timeout,
                                 own=set(self.running))
                await self.take_up_backfills()
                await retention.prune_tombstones(self.database.pool,
                                    self.cfg.server.change_feed_retention_days)
                await self.announce_stale()
                await notify.resend_undelivered(self.database.pool, self.cfg.notify)
            except Exception as exc:
                if not db.unavailable(exc):
                    raise
            await asyncio.sleep(every)

    async def maintain(self) -> None:
        """The maintenance job: retention (runtime/retention.py)."""
        try:
            await retention.purge(self.database.pool, self.cfg)
        except Exception as exc:       # the next tick tries again
            log.error("purge failed", error=str(exc))

    async def announce_stale(self) -> None:
        """Notify of each source gone stale (once per last success: every replica sweeps,
        ``etl_notifications`` keeps one)."""
        if not self.cfg.notify.webhooks:
            return
        rows = await self.database.pool.fetch(db.query("api", "last_runs"))
        last = {r["source"]: r["last_success"] for r in rows}
        if not rows:
            return
        now = rows[0]["now"]            # the database's clock: one for every replica
        for src in self.cfg.sources:
            success = last.get(src.name)
            if stale(src, success, now):
                assert success is not None and src.schedule
                notify.emit(self.database.pool, self.cfg.notify, "stale", src.name,
                            f"{src.name}: no successful run since {success.isoformat()} "
                            f"(its schedule is {src.schedule!r})",
                            details={"last_success": success.isoformat(),
                                     "schedule": src.schedule},
                            once=f"stale:{src.name}:{success.isoformat()}")

    async def stop(self, grace: float) -> None:
        """Stop taking runs; give running ones and webhook deliveries ``grace`` seconds in
        all, then cancel them (undelivered notifications go to the next process)."""
        deadline = time.monotonic() + grace
        self.accepting = False
        self._stopping.set()
        self.loop_monitor.stop()
        if self._sweeper:
            self._sweeper.cancel()
        if self.scheduler and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        # A run claimed while the stop began is registered when its claim returns: wait
        # for that, so that it is waited for too (else its row would stay 'running').
        if self._claims:
            await asyncio.wait(self._claims, timeout=5)
        for task in list(self._backfills.values()):    # not claimed yet: nothing to wait for
            if not any(r.task is task for r in self.running.values()):
                task.cancel()
        tasks = {r.task: run_id for run_id, r in self.running.items()}
        if tasks:
            log.info("waiting for running runs", runs=list(self.running), grace_s=grace)
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:     # else the next start would wait for their heartbeats to age
                await runs.stopped(self.database.pool, [tasks[t] for t in pending])
        for follower in self._followers:          # those standing by for a lock
            follower.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)
        await self.workers.aclose()
        await notify.drain(self.database.pool, max(0.0, deadline - time.monotonic()))
