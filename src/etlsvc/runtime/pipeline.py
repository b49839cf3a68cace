"""One run of one source: read → validate → raw COPY → normalize → checkpoint.

Owns the order of the steps, the transaction of each batch (raw rows, normalized rows,
rejects, checkpoint and run counters commit together or not at all), overlapping the
parsing of the next batch with the database work of the current one, and the run's log
context and summary event. Owns no SQL and no parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import itemgetter
from typing import Any, TypeVar

import asyncpg
import httpx
import msgspec
import structlog

from etlsvc import db
from etlsvc.config import ApiSource, Config, CsvSource, RssSource, Source
from etlsvc.db import Database
from etlsvc.errors import EtlError, SourceBusy, SourceError, describe
from etlsvc.extract import csv_files, json_api, rss_feeds
from etlsvc.extract.contract import RawBatch, Reject
from etlsvc.load import checkpoint
from etlsvc.load import raw as load
from etlsvc.runtime import metrics, runs
from etlsvc.transform import normalize
from etlsvc.transform.validate import RowValidator

log = structlog.get_logger()
T = TypeVar("T")

#: Parse CSV files in a worker process rather than a thread (``etlsvc serve`` sets it, so
#: that a big load does not compete with the API for the GIL).
PARSE_IN_PROCESS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "parse_in_process", default=False)


@dataclass
class Prepared:
    """A batch ready for the database: COPY payload, rejects, counters, checkpoint state."""

    stream: str
    columns: tuple[str, ...]
    payload: bytes
    valid: int
    distinct_keys: bool
    rejects: list[Reject]
    rows_read: int
    bytes_read: int
    state: dict[str, Any]
    pages: int = 0
    lines: int = 0


@dataclass
class Progress:
    """Counters of a run so far, passed to the progress callback after each batch."""

    run_id: int
    source: str
    bytes_total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(runs.COUNTERS, 0))
    #: What the run reports beside an error (stored in the run's notes).
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)


ProgressCallback = Callable[[Progress], None]


async def run_source(database: Database, cfg: Config, src: Source, *, trigger: str = "manual",
                     full_refresh: bool = False,
                     on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run ``src`` once; return its finished ``etl_runs`` row. SourceBusy if already running."""
    [claimed] = await claim(database, [src], trigger=trigger, full_refresh=full_refresh)
    return await claimed.execute(cfg, on_progress)


async def claim(database: Database, sources: list[Source], *, trigger: str,
                full_refresh: bool) -> list[ClaimedRun]:
    """Take every source's lock and create their run rows, or none of them.

    SourceBusy, naming every source that is running, if any is; the runs have ids from here
    on, and ``ClaimedRun.execute`` does the work and lets go.
    """
    held: list[tuple[Source, Any]] = []
    busy: dict[str, int | None] = {}
    try:
        for src in sources:
            conn = await database.pool.acquire()
            held.append((src, conn))
            if not await runs.try_lock(conn, src.name):
                held.pop()
                try:
                    busy[src.name] = await runs.running_id(conn, src.name)
                finally:
                    await database.pool.release(conn)
        if busy:
            raise SourceBusy(busy)
        return [ClaimedRun(await runs.start(conn, src.name, src.kind, trigger, full_refresh,
                                            database.reconnect_timeout),
                           src, trigger, full_refresh, database, conn) for src, conn in held]
    except BaseException:
        for src, conn in held:
            await _let_go(database, src, conn)
        raise


async def _let_go(database: Database, src: Source, conn: Any) -> None:
    """Release the source's lock and the connection (a dead one is just dropped)."""
    with contextlib.suppress(*db.UNAVAILABLE):
        if not conn.is_closed():
            await runs.unlock(conn, src.name)
    with contextlib.suppress(*db.UNAVAILABLE):
        await database.pool.release(conn)


class DatabaseLost(EtlError):
    """The database stayed away longer than ``database.reconnect_timeout``."""


@dataclass
class ClaimedRun:
    """A run whose lock is held (by ``conn``) and whose ``etl_runs`` row exists."""

    id: int
    src: Source
    trigger: str
    full_refresh: bool
    database: Database
    conn: Any

    async def execute(self, cfg: Config,
                      on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Load the source, finish the run row, release the lock; return the row."""
        try:
            return await _execute(cfg, self, on_progress)
        finally:
            await _let_go(self.database, self.src, self.conn)

    async def reconnect(self, deadline: float) -> dict[str, Any]:
        """A new connection holding the source's lock again, with backoff until ``deadline``
        (monotonic); return the run's row as committed. DatabaseLost past the deadline."""
        await _let_go(self.database, self.src, self.conn)
        delay = 0.2
        while True:
            try:
                conn = await self.database.pool.acquire(timeout=5)
            except Exception as exc:
                if not db.unavailable(exc):
                    raise
                problem: BaseException = DatabaseLost(
                    f"database connection lost: {describe(exc)}")
            else:
                if await runs.try_lock(conn, self.src.name):
                    self.conn = conn
                    return await runs.resume(conn, self.id)
                # Another process is claiming the source; it sees this run alive and backs off.
                problem = SourceBusy({self.src.name: await runs.running_id(conn, self.src.name)})
                await self.database.pool.release(conn)
            if time.monotonic() + delay > deadline:
                raise problem
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)


async def _execute(cfg: Config, run: ClaimedRun,
                   on_progress: ProgressCallback | None) -> dict[str, Any]:
    src = run.src
    with structlog.contextvars.bound_contextvars(run_id=run.id, source=src.name):
        log.info("run started", trigger=run.trigger, full_refresh=run.full_refresh)
        progress = Progress(run.id, src.name)
        started = time.monotonic()
        beating = asyncio.create_task(runs.heartbeat(run.database.pool, run.id))
        error = None
        try:
            await _load(cfg, run, progress, on_progress)
        except (EtlError, OSError, UnicodeError) as exc:
            error = str(exc)
        except asyncpg.PostgresError as exc:      # a statement failed: say which error
            error = f"database error: {exc.sqlstate}: {exc}"
        except Exception as exc:  # a bug: the run fails, the service does not
            log.exception("run crashed")
            error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            beating.cancel()
        error = error or _error_rate_exceeded(src, progress.counts)
        row = await _finish(run, progress, error)
        seconds = time.monotonic() - started
        metrics.observe_run(row, seconds)
        (log.error if error else log.info)(
            "run finished", status=row["status"], error=error,
            duration_s=round(seconds, 3),
            rows_per_s=round(row["rows_read"] / seconds) if seconds else None,
            **{k: row[k] for k in runs.COUNTERS})
        return row


async def _load(cfg: Config, run: ClaimedRun, progress: Progress,
                on_progress: ProgressCallback | None) -> None:
    """Run the source's loader; when the connection is lost, reconnect and run it again from
    the last committed checkpoint (each batch commits whole, so nothing is loaded twice)."""
    loader = {"csv": _load_csv, "api": _load_api, "rss": _load_rss}[run.src.kind]
    deadline = committed = None
    while True:
        try:
            # Safe for batches: raw rows, normalized rows and checkpoint commit together, so
            # a commit lost in a server crash loses all three and the next run reads them
            # again. (The pool resets the setting when the connection is released.)
            await run.conn.execute("SET synchronous_commit = off")
            await loader(run.conn, cfg, run.src, progress, run.full_refresh, on_progress)
            return
        except Exception as exc:
            if not await _connection_lost(run, exc):
                raise
            log.warning("database connection lost, reconnecting", error=describe(exc),
                        reconnect_timeout_s=run.database.reconnect_timeout)
            if deadline is None or committed != progress.counts:   # a new outage
                deadline = time.monotonic() + run.database.reconnect_timeout
            row = await run.reconnect(deadline)
            progress.counts = committed = {k: row[k] for k in runs.COUNTERS}
            log.info("reconnected; resuming from the last committed batch",
                     rows_read=row["rows_read"])


async def _connection_lost(run: ClaimedRun, exc: Exception) -> bool:
    """Whether ``exc`` means the run's connection is gone (not a file or upstream error)."""
    if isinstance(exc, EtlError) or not db.unavailable(exc):
        return False
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
        return True
    try:                                    # an OSError: from the database, or a file?
        await run.conn.fetchval("SELECT 1", timeout=5)
    except Exception:
        return True
    return False


async def _finish(run: ClaimedRun, progress: Progress,
                  error: str | None) -> dict[str, Any]:
    """Mark the run finished. If the database is away, wait for it as a batch would; if it
    does not come back, the row is left to the sweep (it marks it interrupted) and the
    caller gets the run as this process knows it."""
    status = "failed" if error else "succeeded"

    async def close() -> dict[str, Any]:
        if progress.warnings:
            await runs.note(run.conn, run.id, {"warnings": progress.warnings})
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


def _error_rate_exceeded(src: Source, counts: dict[str, int]) -> str | None:
    """The failure message if more records were rejected than the source allows."""
    read, rejected = counts["rows_read"], counts["rows_rejected"]
    if read and rejected / read > src.max_error_rate:
        return (f"{rejected} of {read} records rejected ({rejected / read:.1%}), above the "
                f"source's max_error_rate of {src.max_error_rate:.1%}")
    return None


async def _load_csv(conn: Any, cfg: Config, src: Source, progress: Progress,
                    full_refresh: bool, on_progress: ProgressCallback | None) -> None:
    states = await checkpoint.read(conn, src.name, run_id=progress.run_id,
                                   full_refresh=full_refresh)
    files = csv_files.find_files(src, cfg.resolve("."))
    plans = [await asyncio.to_thread(csv_files.plan_file, p, states.get(p)) for p in files]
    progress.bytes_total = sum(p.todo for p in plans)
    await runs.set_total(conn, progress.run_id, progress.bytes_total)
    make_prepare = functools.partial(_csv_preparer, src, progress.run_id)
    for plan in plans:
        if plan.todo <= 0:
            log.info("file unchanged since last run", file=plan.path)
            continue
        log.info("reading file", file=plan.path, start=plan.start, size=plan.size)
        batches = csv_files.read_file(src, plan, make_prepare,
                                      in_process=PARSE_IN_PROCESS.get())
        async for batch in _prefetch(batches):
            await _commit(conn, src, progress, batch)
            if on_progress:
                on_progress(progress)


async def _load_api(conn: Any, cfg: Config, src: ApiSource, progress: Progress,
                    full_refresh: bool, on_progress: ProgressCallback | None) -> None:
    states = await checkpoint.read(conn, src.name, run_id=progress.run_id,
                                   full_refresh=full_refresh)
    state = states.get(src.url)
    if src.url in states.mine and not (state or {}).get("request"):
        log.info("the walk was finished earlier in this run")
        return
    if not state or not state.get("request"):
        state = json_api.first_request(src, state)
    else:
        log.info("resuming the walk", page=state["page"] + 1)
    async with json_api.http_client(src) as client:
        fetcher = json_api.Fetcher(src, client)
        async for page in _prefetch(json_api.walk(src, fetcher, state, progress.warn)):
            batch = _prepare_page(src, progress.run_id, page)
            await _commit(conn, src, progress, batch)
            if on_progress:
                on_progress(progress)


def _prepare_page(src: ApiSource, run_id: int, page: json_api.Page) -> Prepared:
    """An API page as a batch; items at the previous high-water mark already loaded are
    skipped."""
    keep = json_api.skip_boundary(src, page.state, page.items)
    if skipped := keep.count(False):
        log.info("items at the previous high-water mark skipped", count=skipped)
    return _prepare_items(
        src, run_id, checkpoint_stream=src.url, raw_stream=page.url, items=page.items,
        raws=page.raw, positions=[(page.number, i) for i in range(len(page.items))],
        where=lambda i: {"page": page.number, "index": i}, keep=keep, state=page.state,
        size=page.size)


def _prepare_items(src: ApiSource | RssSource, run_id: int, *, checkpoint_stream: str,
                   raw_stream: str, items: list[Any], raws: list[bytes],
                   positions: list[tuple[int, ...]], where: Callable[[int], dict[str, int]],
                   keep: list[bool], state: dict[str, Any], size: int) -> Prepared:
    """Validation and COPY encoding of JSON items (small batches: done on the loop)."""
    columns = list(dict.fromkeys(src.fields.mapped().values()))
    objects = [isinstance(item, dict) for item in items]
    rows = json_api.project([i if o else {} for i, o in zip(items, objects)], columns)
    bad = RowValidator(columns, src.fields).check(rows)
    read = keep.count(True)
    rejects = []
    for i, item in enumerate(items):
        reason = bad.get(i) if objects[i] else "the item is not a JSON object"
        if keep[i] and reason:
            keep[i] = False
            rejects.append(Reject(raw_stream, where(i), item, reason))
    kept = [i for i, k in enumerate(keep) if k]
    key_col = columns.index(src.fields.source_id)
    keys = [rows[i][key_col] for i in kept]
    payload = load.items_payload(run_id, src.name, raw_stream, [positions[i] for i in kept],
                                 keys, [raws[i] for i in kept])
    copy_columns = load.API_COLUMNS if src.kind == "api" else load.RSS_COLUMNS
    return Prepared(checkpoint_stream, copy_columns, payload, len(keys),
                    len(set(keys)) == len(keys), rejects, read, size, state, pages=1)


async def _load_rss(conn: Any, cfg: Config, src: RssSource, progress: Progress,
                    full_refresh: bool, on_progress: ProgressCallback | None) -> None:
    states = await checkpoint.read(conn, src.name, run_id=progress.run_id,
                                   full_refresh=full_refresh)
    outcomes: dict[str, dict[str, Any]] = {}
    async with json_api.http_client(src) as client:
        async for feed in rss_feeds.fetch_all(src, client, states):
            outcomes[feed.url] = {"status": feed.status, "entries": len(feed.entries),
                                  "problem": feed.problem}
            (log.warning if feed.problem else log.info)(
                "feed " + feed.status, feed=feed.url, entries=len(feed.entries),
                problem=feed.problem)
            if feed.status != "loaded":
                continue
            raws = [msgspec.json.encode(e) for e in feed.entries]
            batch = _prepare_items(
                src, progress.run_id, checkpoint_stream=feed.url, raw_stream=feed.url,
                items=feed.entries, raws=raws, positions=[(i,) for i in range(len(raws))],
                where=lambda i: {"entry": i}, keep=[True] * len(raws), state=feed.state,
                size=feed.size)
            await _commit(conn, src, progress, batch)
            if on_progress:
                on_progress(progress)
    await runs.note(conn, progress.run_id, {"feeds": outcomes})
    failed = {u: o["problem"] for u, o in outcomes.items() if o["status"] == "failed"}
    if failed:
        raise SourceError(src.name, f"{len(failed)} of {len(outcomes)} feeds failed: " +
                          "; ".join(failed.values()))


def _csv_preparer(src: Source, run_id: int) -> Callable[[RawBatch], Prepared]:
    """Validation and COPY encoding of one CSV batch (runs in the parsing thread)."""
    validators: dict[tuple[str, ...], RowValidator] = {}

    def prepare(batch: RawBatch) -> Prepared:
        columns = tuple(batch.columns)
        validator = validators.get(columns)
        if validator is None:
            validator = validators[columns] = RowValidator(batch.columns, src.fields)
        if validator.missing and batch.rows:
            raise csv_files.missing_columns(src, batch.stream, batch.columns)
        bad = validator.check(batch.rows)
        keep = None
        rejects = batch.rejects
        if bad:
            keep = [True] * len(batch.rows)
            for i, reason in bad.items():
                keep[i] = False
                line, offset = batch.positions[i]
                rejects.append(Reject(batch.stream, {"line": line, "byte_offset": offset},
                                      dict(zip(batch.columns, batch.rows[i])), reason))
            rejects.sort(key=lambda r: r.position["line"])
        key_col = batch.columns.index(src.fields.source_id) if batch.rows else 0
        payload, valid = load.csv_payload(batch, run_id, src.name, key_col, keep)
        kept = batch.rows if keep is None else compress(batch.rows, keep)
        keys = list(map(itemgetter(key_col), kept))
        return Prepared(batch.stream, load.CSV_COLUMNS, payload, valid,
                        len(set(keys)) == len(keys), rejects, batch.rows_read, batch.bytes_read,
                        batch.state, lines=batch.lines_read)

    return prepare


async def _commit(conn: Any, src: Source, progress: Progress, batch: Prepared) -> None:
    """One transaction: raw rows, normalized rows, rejects, checkpoint, run counters."""
    async with db.failing_fast(conn), conn.transaction():
        mark = await normalize.next_raw_id(conn, src.kind)
        await load.copy_raw(conn, src.kind, batch.columns, batch.payload)
        inserted, updated = (0, 0)
        if batch.valid:
            inserted, updated = await normalize.upsert(
                conn, source=src.name, kind=src.kind, fields=src.fields,
                tags_separator=src.tags_separator, above=mark,
                distinct_keys=batch.distinct_keys)
        await load.insert_rejects(conn, progress.run_id, src.name, batch.rejects)
        await checkpoint.write(conn, src.name, batch.stream, batch.state, progress.run_id)
        counts = {"rows_read": batch.rows_read, "rows_valid": batch.valid,
                  "rows_rejected": len(batch.rejects), "rows_inserted": inserted,
                  "rows_updated": updated, "rows_unchanged": batch.valid - inserted - updated,
                  "bytes_read": batch.bytes_read, "pages_read": batch.pages,
                  "lines_read": batch.lines}
        await runs.add(conn, progress.run_id, counts)
    for k, v in counts.items():
        progress.counts[k] += v


_END = object()


async def _prefetch(items: AsyncIterator[T], depth: int = 1) -> AsyncIterator[T]:
    """Iterate ``items`` with up to ``depth`` items produced ahead (overlaps CPU and I/O)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=depth)

    async def produce() -> None:
        try:
            async for item in items:
                await queue.put(item)
            await queue.put(_END)
        except Exception as exc:
            await queue.put(_Failed(exc))

    task = asyncio.create_task(produce())
    try:
        for _ in repeat(None):
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@dataclass
class _Failed:
    exc: Exception


async def check_source(cfg: Config, src: Source) -> str:
    """What ``etlsvc check`` says of a source; SourceError if it cannot be read or mapped."""
    if not isinstance(src, CsvSource):
        once = msgspec.structs.replace(src, retry=msgspec.structs.replace(src.retry, attempts=1))
        requests = ([json_api.first_request(once, None)["request"]] if isinstance(once, ApiSource)
                    else [{"url": u, "params": {}} for u in once.urls])
        answers = []
        async with httpx.AsyncClient(timeout=src.timeouts.connect) as client:
            for request in requests:
                response, _ = await json_api.Fetcher(once, client).get(request["url"],
                                                                       request["params"])
                answers.append(f"GET {response.url}: HTTP {response.status_code}")
        return "; ".join(answers)
    files = csv_files.find_files(src, cfg.resolve("."))
    for path in files:
        header = csv_files.read_header(src, path)
        if any(c not in header for c in src.fields.mapped().values()):
            raise csv_files.missing_columns(src, path, header)
    return f"{len(files)} file(s), mapped columns present"


async def replay_source(database: Database, cfg: Config, src: Source,
                        chunk: int = 10_000) -> dict[str, Any]:
    """Normalize ``src`` again from its raw rows with the current mapping, in one transaction.

    Raw rows are validated again (a mapping change can make a row invalid: it becomes a
    reject of this run); normalized rows whose key no raw row produces any more are deleted.
    If more rows are rejected than the source's ``max_error_rate`` allows, the whole replay
    is rolled back: a wrong mapping never empties the table.
    """
    async with database.pool.acquire() as conn, runs.source_lock(conn, src.name):
        run_id = await runs.start(conn, src.name, src.kind, "replay", False,
                                  database.reconnect_timeout)
        with structlog.contextvars.bound_contextvars(run_id=run_id, source=src.name):
            log.info("replay started")
            counts = dict.fromkeys(runs.COUNTERS, 0)
            error = None
            try:
                async with conn.transaction():
                    await _replay(conn, src, run_id, chunk, counts)
            except (EtlError, OSError) as exc:
                error = str(exc)
            await runs.add(conn, run_id, counts)
            row = await runs.finish(conn, run_id, "failed" if error else "succeeded", error)
            (log.error if error else log.info)(
                "replay finished", status=row["status"], error=error,
                **{k: row[k] for k in runs.COUNTERS})
            return row


async def _replay(conn: Any, src: Source, run_id: int, chunk: int,
                  counts: dict[str, int]) -> None:
    table = load.RAW_TABLES[src.kind]
    key_path = normalize.paths(src.fields, src.kind)[0]
    await conn.execute("CREATE TEMP TABLE replay_keys (key text PRIMARY KEY) ON COMMIT DROP")
    validators: dict[tuple[str, ...], RowValidator] = {}
    last = 0
    first_reason = None
    while True:
        stream, position = load.RAW_POSITIONS[src.kind]
        raw = await conn.fetch(
            f"SELECT id, {stream} AS stream, {position} AS position, record FROM {table} "
            "WHERE source = $1 AND id > $2 ORDER BY id LIMIT $3", src.name, last, chunk)
        if not raw:
            break
        skip: list[int] = []
        rejects: list[Reject] = []
        for columns, group in _by_columns(src, raw).items():
            validator = validators.get(columns) or validators.setdefault(
                columns, RowValidator(list(columns), src.fields))
            if src.kind == "csv":
                rows = [list(r["record"].values()) for r in group]
            else:
                rows = json_api.project([r["record"] for r in group], list(columns))
            bad = validator.check(rows)
            if validator.missing:
                bad = dict.fromkeys(range(len(rows)), "mapped column not in the record: " +
                                    ", ".join(c for _, c in validator.missing))
            for i, reason in bad.items():
                r = group[i]
                skip.append(r["id"])
                rejects.append(Reject(r["stream"], r["position"], r["record"], reason))
        inserted, updated = await normalize.upsert(
            conn, source=src.name, kind=src.kind, fields=src.fields,
            tags_separator=src.tags_separator, above=last, upto=raw[-1]["id"], skip=skip)
        await conn.execute(
            f"INSERT INTO replay_keys SELECT DISTINCT record #>> $4::text[] FROM {table} "
            "WHERE source = $1 AND id > $2 AND id <= $3 AND id <> ALL ($5::bigint[]) "
            "ON CONFLICT DO NOTHING", src.name, last, raw[-1]["id"], key_path, skip)
        await load.insert_rejects(conn, run_id, src.name, rejects)
        first_reason = first_reason or (rejects[0].reason if rejects else None)
        valid = len(raw) - len(skip)
        for k, v in (("rows_read", len(raw)), ("rows_valid", valid),
                     ("rows_rejected", len(skip)), ("rows_inserted", inserted),
                     ("rows_updated", updated), ("rows_unchanged", valid - inserted - updated)):
            counts[k] += v
        last = raw[-1]["id"]
    if failure := _error_rate_exceeded(src, counts):
        example = f"; first reason: {first_reason}" if first_reason else ""
        raise SourceError(src.name, f"replay rolled back: {failure}{example}")
    deleted = await conn.execute(
        "DELETE FROM normalized_data n WHERE n.source = $1 AND NOT EXISTS "
        "(SELECT 1 FROM replay_keys k WHERE k.key = n.source_id)", src.name)
    log.info("stale normalized rows deleted", count=int(deleted.split()[-1]))


def _by_columns(src: Source, raw: list[Any]) -> dict[tuple[str, ...], list[Any]]:
    """Raw rows grouped by the columns to validate: a CSV file's header, an API's paths."""
    if src.kind != "csv":
        return {tuple(dict.fromkeys(src.fields.mapped().values())): raw}
    groups: dict[tuple[str, ...], list[Any]] = {}
    for r in raw:
        groups.setdefault(tuple(r["record"]), []).append(r)
    return groups
