"""Run control and rejects: ``POST /etl/run``, ``/etl/runs``, a run's log, ``/etl/rejects``
(list, retry, ignore).

Runs are started through ``runtime/service.py``; rejects are retried and ignored by
``runtime/retry.py``. SQL comes from ``sql/queries/api.sql``.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromQuery, JSONBody, PathParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from etlsvc import db, logtail
from etlsvc.api.http import (
    READ,
    WRITE_ERRORS,
    ApiError,
    configured_source,
    decode_cursor,
    encode_json,
    envelope,
    keyset_page,
    note,
    read_pool,
    require_json_body,
    service_of,
    tenant_sources,
)
from etlsvc.errors import RollbackError, SourceBusy
from etlsvc.extract import KINDS
from etlsvc.runtime import retry, rollback


class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /etl/run (optional): which sources (all when absent), and whether to
    ignore checkpoints."""

    sources: Annotated[list[str], msgspec.Meta(min_length=1)] | None = None
    full_refresh: bool = False


@post("/etl/run", status_code=202, summary="Start runs (API key required)",
      responses=WRITE_ERRORS, opt={"scope": "run", "audit": "runs.start"},
      guards=[require_json_body])
async def start_runs(request: Request, data: JSONBody[RunRequest | None] = None) -> dict[str, Any]:
    """Start a run of each requested source (all by default), or of none if any is running
    already (409 lists them); 202 with their ids."""
    service = service_of(request)
    body = data or RunRequest()
    sources = [configured_source(request, n) for n in body.sources] if body.sources else [
        s for s in tenant_sources(request) if not KINDS[s.kind].continuous]
    note(request, ",".join(s.name for s in sources))
    if streams := [s.name for s in sources if KINDS[s.kind].continuous]:
        raise ApiError(409, "continuous_source", f"source {streams[0]!r} is a stream: "
                       "`etlsvc serve` consumes it continuously, so it cannot be started "
                       "by a request (its run is in GET /etl/runs)", source=streams[0])
    try:
        ids = await service.start_runs(sources, full_refresh=body.full_refresh)
    except SourceBusy as exc:
        raise ApiError(409, "source_running", str(exc), source=exc.source,
                       running_run_id=exc.run_id, running=[
                           {"source": s, "run_id": r} for s, r in exc.running.items()]) from None
    note(request, ",".join(s.name for s in sources), runs=ids)
    return envelope(request, {"runs": [{"source": s.name, "run_id": i}
                                       for s, i in zip(sources, ids)]})


def run_view(row: Any) -> dict[str, Any]:
    """A run row with its progress (percent where the size is known)."""
    run = dict(row)
    total = run.get("bytes_total")
    run["percent"] = (round(100 * run["bytes_read"] / total, 1)
                      if total else (100.0 if run["status"] != "running" else None))
    # The moment the run finished, as GET /data?as_of= takes it.
    snap = run.pop("finished_snapshot", None)
    run["finished_as_of"] = None if snap is None else \
        f"{snap[0]}:{snap[1]}:{','.join(map(str, snap[2]))}"
    return run


@get("/etl/runs", summary="Run history, newest first", **READ)
async def list_runs(
    request: Request,
    source: FromQuery[str | None] = None,
    status: Annotated[str | None, QueryParameter(
        pattern="^(running|succeeded|failed|interrupted)$")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    cursor: FromQuery[str | None] = None,
) -> dict[str, Any]:
    """Runs, filtered by source and status, paged by cursor."""
    filters = ("runs", source, status)
    before = decode_cursor(cursor, filters) if cursor else db.MAX_ID
    rows, pagination = keyset_page(await read_pool(request).fetch(
        db.query("api", "runs_page"), before, limit + 1, source, status), limit, filters)
    return envelope(request, [run_view(r) for r in rows], pagination)


@get("/etl/runs/{run_id:int}", summary="One run, with live progress", **READ)
async def get_run(request: Request,
                  run_id: Annotated[int, PathParameter(ge=0, le=db.MAX_ID)]) -> dict[str, Any]:
    row = await read_pool(request).fetchrow(db.query("runs", "get"), run_id)
    if row is None:
        raise NotFoundException(f"no run {run_id}")
    return envelope(request, run_view(row))


@get("/etl/runs/{run_id:int}/log", summary="A run's log lines, then new ones live "
     "(server-sent events)", media_type="text/event-stream", **READ)
async def run_log(request: Request,
                  run_id: Annotated[int, PathParameter(ge=0, le=db.MAX_ID)]) -> ServerSentEvent:
    """The log events of a run executed by this process: the last 500 kept, then each new
    one as it is logged, as one SSE ``data:`` line each (a run of another replica has none
    here). A comment line every 15 s keeps idle connections open. 404 for a run the
    caller may not read (row-level security decides, as for ``GET /etl/runs/{id}``)."""
    if await read_pool(request).fetchrow(db.query("runs", "get"), run_id) is None:
        raise NotFoundException(f"no run {run_id}")
    keep = logtail.LogFilter(run_id=run_id)

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        # Subscribing and copying the history happen with no await between: no event is
        # missed or sent twice.
        with logtail.HUB.subscribe() as queue:
            for event in logtail.HUB.history(run_id):
                yield ServerSentEventMessage(data=encode_json(event).decode())
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    yield ServerSentEventMessage(comment="keep-alive")
                    continue
                if keep(event):
                    yield ServerSentEventMessage(data=encode_json(event).decode())

    return ServerSentEvent(events())


@get("/etl/rejects", summary="Rejected records, with position and reason",
     **READ)
async def list_rejects(
    request: Request,
    run_id: Annotated[int | None, QueryParameter(ge=0, le=db.MAX_ID)] = None,
    source: FromQuery[str | None] = None,
    status: Annotated[str | None, QueryParameter(pattern="^(open|resolved|ignored)$")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    cursor: FromQuery[str | None] = None,
) -> dict[str, Any]:
    """Rejects of a run or a source, oldest first, paged by cursor: each with the rule it
    broke (field, column, value) and its status (open, resolved, ignored)."""
    filters = ("rejects", run_id, source, status)
    after = decode_cursor(cursor, filters) if cursor else 0
    rows, pagination = keyset_page(await read_pool(request).fetch(
        db.query("api", "rejects_page"), after, limit + 1, run_id, source, status), limit,
        filters)
    return envelope(request, [dict(r) for r in rows], pagination)


class RejectsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Which open rejects: of a source, optionally of one run or by id."""

    source: str
    run_id: Annotated[int, msgspec.Meta(ge=1, le=db.MAX_ID)] | None = None
    ids: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=db.MAX_ID)]],
                   msgspec.Meta(min_length=1, max_length=10_000)] | None = None


@post("/etl/rejects/retry", status_code=200,
      summary="Validate open rejects again and load the valid ones (API key required)",
      responses=WRITE_ERRORS, opt={"scope": "run", "audit": "rejects.retry"},
      guards=[require_json_body])
async def retry_rejects(request: Request, data: JSONBody[RejectsRequest]) -> dict[str, Any]:
    """Re-validate the source's open rejects under the current rules and mapping; load the
    ones now valid (raw row, normalized row and the reject's status in one transaction,
    each once even if retries race). Answers with the retry run: ``rows_valid`` loaded,
    ``rows_rejected`` still open."""
    src = configured_source(request, data.source)
    note(request, src.name, run_id=data.run_id, ids=data.ids)
    try:
        row = await retry.retry(service_of(request).database, src, run_id=data.run_id,
                                ids=data.ids)
    except SourceBusy as exc:
        raise ApiError(409, "source_running", str(exc), source=exc.source,
                       running_run_id=exc.run_id) from None
    return envelope(request, run_view(row))


@post("/etl/rejects/ignore", status_code=200,
      summary="Mark open rejects as ignored (API key required)",
      responses=WRITE_ERRORS, opt={"scope": "run", "audit": "rejects.ignore"},
      guards=[require_json_body])
async def ignore_rejects(request: Request, data: JSONBody[RejectsRequest]) -> dict[str, Any]:
    """Mark the source's open rejects (of a run, or by id) ignored: nobody will fix them."""
    src = configured_source(request, data.source)
    count = await retry.ignore(service_of(request).database, src, run_id=data.run_id,
                               ids=data.ids)
    note(request, src.name, run_id=data.run_id, ids=data.ids, ignored=count)
    return envelope(request, {"source": src.name, "ignored": count})


class RollbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Which source to roll back, to its state right after which of its runs."""

    source: str
    to_run: Annotated[int, msgspec.Meta(ge=1, le=db.MAX_ID)]
    #: Leave the checkpoints where they are: the next run does not read again what was
    #: rolled back.
    keep_position: bool = False
    #: Count what would change, change nothing.
    dry_run: bool = False


_ROLLBACK_STATUS = {"no_source": 404, "no_run": 404, "run_running": 409, "no_moment": 422,
                    "no_history": 422, "purged": 410, "no_rewind": 422}


@post("/etl/rollback", status_code=200,
      summary="Roll a source back to its state right after one of its runs (admin key)",
      responses=WRITE_ERRORS, opt={"scope": "admin", "audit": "rollback"},
      guards=[require_json_body])
async def roll_back(request: Request, data: JSONBody[RollbackRequest]) -> dict[str, Any]:
    """Make the source's rows what they were right after run ``to_run``, in one transaction,
    as a run of its own (trigger ``rollback``) whose changes the feed carries; the
    checkpoints go back too, unless ``keep_position``. ``dry_run``: only the counts
    (``deleted``, ``updated``, ``inserted``). 409 while the source runs."""
    service = service_of(request)
    src = configured_source(request, data.source)
    note(request, src.name, to_run=data.to_run, dry_run=data.dry_run)
    try:
        done = await rollback.rollback(service.database, src, data.to_run,
                                       keep_position=data.keep_position, dry_run=data.dry_run)
    except SourceBusy as exc:
        raise ApiError(409, "source_running", str(exc), source=exc.source,
                       running_run_id=exc.run_id) from None
    except RollbackError as exc:
        raise ApiError(_ROLLBACK_STATUS.get(exc.code, 409), exc.code, str(exc)) from None
    if "run" in done:
        done["run"] = run_view(done["run"])
    return envelope(request, done)


HANDLERS = [start_runs, list_runs, get_run, run_log, list_rejects, retry_rejects, ignore_rejects,
            roll_back]
