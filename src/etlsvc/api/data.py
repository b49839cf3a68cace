"""The read API over ``normalized_data``: ``GET /data`` (filters, keyset pages, ETags) and
``GET /data/{id}`` (one record with its lineage: raw record and run).

Owns turning a request's filters into one statement per combination of filters (each with
its own plan; see ``sql/queries/api.sql``), read on the read pool.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from functools import cache
from typing import Annotated, Any

import msgspec
from litestar import MediaType, Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.params import FromQuery, PathParameter, QueryParameter

from etlsvc import db
from etlsvc.api.http import (
    READ,
    ApiError,
    decode_cursor,
    encode_json,
    envelope,
    keyset_page,
    read_pool,
    utc_param,
)
from etlsvc.api.runs import run_view
from etlsvc.extract import KINDS


class DataRow(msgspec.Struct):
    """A record of GET /data: the columns of ``data_page`` and ``data_window``, in order."""

    id: int
    kind: str
    source: str
    source_id: str
    title: str | None
    description: str | None
    category: str | None
    amount: str | None
    url: str | None
    tags: list[str] | None
    event_time: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


_DATA_COLUMNS = len(DataRow.__struct_fields__)



#: The filters of GET /data, in the order of its parameters, with their SQL conditions.
DATA_FILTERS = dict(line.split(None, 1) for line in db.query("api", "data_filters").splitlines()
                    if line and not line.startswith("--"))


#: Range filters: their pages look for the matching ids first (``data_window``).
RANGE_FILTERS = frozenset({"event_from", "event_to", "updated_since"})
#: More matching rows than this, and a range-filtered page walks the primary key instead.
WINDOW_CAP = 20_000
#: More sources of a kind than this, and a kind page walks the primary key instead.
MAX_KIND_PARTS = 32


@cache
def data_page_sql(given: tuple[str, ...], query: str = "data_page") -> str:
    """The statement of a /data page with the filters ``given`` (one per combination)."""
    conditions = "".join(f"\n  AND {DATA_FILTERS[name].strip().format(n=i)}"
                         for i, name in enumerate(given, 3))
    return db.query("api", query).replace("{filters}", conditions)


@cache
def data_by_kind_sql(given: tuple[str, ...], sources: int) -> str:
    """A page with the kind filter and not source: the union of the first rows of each of
    ``sources`` sources (parameters after the filters), merged in id order."""
    part = data_page_sql(given, "data_by_kind")
    parts = [part.replace("{source}", f"${n}")
             for n in range(3 + len(given), 3 + len(given) + sources)]
    return ("SELECT * FROM (\n(" + ")\nUNION ALL\n(".join(parts) +
            ")\n) page ORDER BY id LIMIT $2")


async def data_rows(pool: Any, given: dict[str, Any], after: int, limit: int) -> list[Any]:
    """Up to ``limit`` rows after ``after`` that match ``given``, in id order."""
    names = tuple(given)
    if RANGE_FILTERS.isdisjoint(names):
        if names[:1] == ("kind",):           # kind without source (filters keep their order)
            sources = [r["source"] for r in await pool.fetch(
                db.query("api", "kind_sources"), given["kind"])]
            if not sources:
                return []
            # Each part is planned on every request: the number of parts is capped, and
            # a kind with more sources than that is walked along the primary key.
            if len(sources) <= MAX_KIND_PARTS:
                return await pool.fetch(data_by_kind_sql(names, len(sources)), after,
                                        limit, *given.values(), *sources)
        return await pool.fetch(data_page_sql(names), after, limit, *given.values())
    rows = await pool.fetch(data_page_sql(names, "data_window"), after, limit, *given.values())
    if rows and rows[0]["matching"] > WINDOW_CAP:
        return await pool.fetch(data_page_sql(names), after, limit, *given.values())
    return rows


@get("/data", summary="Normalized records, keyset-paginated", **READ)
async def list_data(
    request: Request,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    cursor: FromQuery[str | None] = None,
    source: FromQuery[str | None] = None,
    kind: Annotated[str | None, QueryParameter(pattern="^(" + "|".join(KINDS) + ")$")] = None,
    category: FromQuery[str | None] = None,
    event_from: FromQuery[dt.datetime | None] = None,
    event_to: FromQuery[dt.datetime | None] = None,
    updated_since: FromQuery[dt.datetime | None] = None,
) -> Response[dict[str, Any]]:
    """A page of records in a stable order (by id); ``next_cursor`` continues after it."""
    event_from, event_to = utc_param("event_from", event_from), utc_param("event_to", event_to)
    updated_since = utc_param("updated_since", updated_since)
    filters = ("data", source, kind, category, event_from, event_to, updated_since)
    after = decode_cursor(cursor, filters) if cursor else 0
    given = {name: value for name, value in zip(DATA_FILTERS, filters[1:]) if value is not None}
    pool = read_pool(request)
    # The ETag names the query and the data version it was read at, so a conditional
    # request is answered before any query (the version is at most 0.5 s old: a page can
    # be reported unchanged for that long after a commit).
    version = await request.app.state.data_version.get(pool)
    etag = '"' + hashlib.blake2b(request.scope["query_string"] + version.to_bytes(8),
                                 digest_size=16).hexdigest() + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(content=None, status_code=304, headers={"ETag": etag})
    rows, pagination = keyset_page(await data_rows(pool, given, after, limit + 1), limit,
                                   filters)
    # Encoded once, from structs (a quarter of the cost of dicts).
    data = encode_json([DataRow(*r[:_DATA_COLUMNS]) for r in rows])
    meta = encode_json(envelope(request, None, pagination)["metadata"])
    return Response(content=b'{"data":' + data + b',"metadata":' + meta + b"}",
                    media_type=MediaType.JSON, headers={"ETag": etag})



@get("/data/{record_id:int}", summary="One record with its lineage", **READ)
async def get_record(
        request: Request,
        record_id: Annotated[int, PathParameter(ge=0, le=db.MAX_ID)]) -> dict[str, Any]:
    """The record, the raw record it came from, and the run that produced it."""
    pool = read_pool(request)
    row = await pool.fetchrow(db.query("api", "data_one"), record_id)
    if row is None:
        raise NotFoundException(f"no record {record_id}")
    record = dict(row)
    table = record.pop("raw_table")
    if table not in {k.raw_table for k in KINDS.values()}:
        raise ApiError(500, "internal", "unknown raw table")
    raw = await pool.fetchrow(f"SELECT * FROM {table} WHERE id = $1",
                              record.pop("raw_id"))
    run = await pool.fetchrow(db.query("runs", "get"), record.pop("run_id"))
    record["lineage"] = {"raw_table": table, "raw": dict(raw) if raw else None,
                         "run": run_view(run) if run else None}
    return envelope(request, record)


HANDLERS = [list_data, get_record]
