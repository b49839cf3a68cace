"""Backfills over HTTP: ``POST /etl/backfill`` (make one, or go on with the same range),
``GET /etl/backfill`` and ``/etl/backfill/{id}`` (status and progress), and
``POST /etl/backfill/{id}/cancel``. The work is ``runtime/backfill.py``'s, run by the
service in the background.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromQuery, JSONBody, PathParameter, QueryParameter

from etlsvc import db
from etlsvc.api.http import (
    READ,
    WRITE_ERRORS,
    ApiError,
    configured_source,
    envelope,
    note,
    read_pool,
    require_json_body,
    service_of,
    tenant_sources,
)
from etlsvc.errors import BackfillError
from etlsvc.runtime import backfill

_STATUS = {"no_backfill": 422, "bad_range": 422, "backfill_open": 409,
           "backfill_running": 409, "backfill_over": 409, "unknown_backfill": 404}


class BackfillRequest(msgspec.Struct, forbid_unknown_fields=True, rename={"start": "from",
                                                                          "end": "to"}):
    """A range of a source to read again; what ``from`` and ``to`` are is the kind's
    (README, "Backfills"), both inclusive, either left out for an open end."""

    source: str
    start: Annotated[str, msgspec.Meta(max_length=1000)] | None = None
    end: Annotated[str, msgspec.Meta(max_length=1000)] | None = None
    #: pg_cdc, mysql_cdc: the table (default: the source's only one).
    table: Annotated[str, msgspec.Meta(max_length=200)] | None = None


def _error(exc: BackfillError) -> ApiError:
    return ApiError(_STATUS.get(exc.code, 409), exc.code, str(exc))


@post("/etl/backfill", status_code=202,
      summary="Read a range of a source again, beside its live run (API key required)",
      responses=WRITE_ERRORS, opt={"scope": "run", "audit": "backfill.start"},
      guards=[require_json_body])
async def start_backfill(request: Request, data: JSONBody[BackfillRequest]) -> dict[str, Any]:
    """Make a backfill of the range (or find the unfinished or failed one of the same
    range: it goes on from where it stopped) and run it in the background; 202 with it.
    Its progress is at ``GET /etl/backfill/{id}``. 409 if another range of the source is
    pending or running."""
    service = service_of(request)
    src = configured_source(request, data.source)
    note(request, src.name, start=data.start, end=data.end, table=data.table)
    try:
        row = await backfill.create(service.database.pool, src, stream=data.table,
                                    start=data.start, end=data.end)
    except BackfillError as exc:
        raise _error(exc) from None
    service.start_backfill(src, row["id"])
    return envelope(request, row)


@get("/etl/backfill", summary="Backfills, newest first", **READ)
async def list_backfills(
    request: Request, source: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    return envelope(request, await backfill.listing(read_pool(request), source, limit))


@get("/etl/backfill/{backfill_id:int}", summary="One backfill: status and progress", **READ)
async def get_backfill(request: Request, backfill_id: Annotated[
        int, PathParameter(ge=0, le=db.MAX_ID)]) -> dict[str, Any]:
    """Its status, its runs, and its progress: counters over its runs, where its last batch
    was read (``at``) and the fraction done where the range says it."""
    row = await backfill.get(read_pool(request), backfill_id)
    if row is None:
        raise NotFoundException(f"no backfill {backfill_id}")
    return envelope(request, row)


@post("/etl/backfill/{backfill_id:int}/cancel", status_code=202,
      summary="Stop a backfill (API key required)", responses=WRITE_ERRORS,
      opt={"scope": "run", "audit": "backfill.cancel"})
async def cancel_backfill(request: Request, backfill_id: Annotated[
        int, PathParameter(ge=0, le=db.MAX_ID)]) -> dict[str, Any]:
    """A running backfill stops within a second (the batch in flight rolls back; what
    committed stays); one nobody runs is cancelled at once."""
    note(request, f"backfill {backfill_id}")
    # Only a backfill of one of the caller's own sources (one shared with it is only read).
    seen = await backfill.get(read_pool(request), backfill_id)
    if seen is None or seen["source"] not in {s.name for s in tenant_sources(request)}:
        raise NotFoundException(f"no backfill {backfill_id}")
    try:
        row = await backfill.cancel(service_of(request).database.pool, backfill_id)
    except BackfillError as exc:
        raise _error(exc) from None
    return envelope(request, row)


HANDLERS = [start_backfill, list_backfills, get_backfill, cancel_backfill]
