"""The read API over ``normalized_data``: ``GET /data`` (filters, keyset pages, ETags),
``GET /data/{id}`` (one record with its lineage: raw record and run), both also ``as_of`` a
moment, and ``GET /data/{id}/history`` (every version of a record).

Owns turning a request's filters into one statement per combination of filters (each with
its own plan; see ``sql/queries/api.sql``), read on the read pool.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from functools import cache
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.openapi.spec import Example
from litestar.params import FromQuery, PathParameter, QueryParameter
from msgspec import UNSET, UnsetType

from etlsvc import db
from etlsvc.api import versions
from etlsvc.api.http import (
    READ,
    ApiError,
    Hidden,
    decode_cursor,
    encode_cursor,
    envelope,
    hidden_fields,
    json_page,
    keyset_page,
    read_pool,
    scope_tag,
    served,
    utc_param,
)
from etlsvc.api.runs import run_view
from etlsvc.extract import KINDS


class DataRow(msgspec.Struct):
    """A record of GET /data: the columns of ``data_page`` and ``data_window``, in order.
    A field hidden from the caller (a key's grant, a share) is left out (``UNSET``)."""

    id: int
    kind: str
    source: str
    source_id: str
    title: str | UnsetType | None
    description: str | UnsetType | None
    category: str | UnsetType | None
    amount: str | UnsetType | None
    url: str | UnsetType | None
    tags: list[str] | UnsetType | None
    event_time: dt.datetime | UnsetType | None
    created_at: dt.datetime
    updated_at: dt.datetime


_DATA_COLUMNS = len(DataRow.__struct_fields__)


def data_rows_seen(rows: Any, hidden: Hidden | None) -> list[DataRow]:
    """The records of ``rows`` (columns in DataRow's order), less what is hidden."""
    records = [DataRow(*r[:_DATA_COLUMNS]) for r in rows]
    if hidden is not None:
        for record in records:
            hide(record, hidden.of(record.source))
    return records


def hide(record: DataRow, fields: frozenset[str]) -> DataRow:
    for name in fields:
        setattr(record, name, UNSET)
    return record



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
def as_of_page_sql(given: tuple[str, ...]) -> str:
    """The statement of a /data page as of a moment with the filters ``given``."""
    conditions = "".join(f"\n       AND {DATA_FILTERS[name].strip().format(n=i)}"
                         for i, name in enumerate(given, 4))
    return versions.reading_sql("data_page", "$3").replace("{filters}", conditions)


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
    as_of: FromQuery[str | None] = None,
) -> Response[dict[str, Any]]:
    """A page of records in a stable order (by id); ``next_cursor`` continues after it.
    With ``as_of`` (a time, a change-feed token, or the ``as_of`` of an earlier answer),
    the records as they were then; keep the answer's ``as_of`` for the next pages."""
    event_from, event_to = utc_param("event_from", event_from), utc_param("event_to", event_to)
    updated_since = utc_param("updated_since", updated_since)
    filters = ("data", source, kind, category, event_from, event_to, updated_since)
    pool = read_pool(request)
    if as_of is not None:
        return await _list_as_of(request, pool, as_of, filters, cursor, limit)
    after = decode_cursor(cursor, filters) if cursor else 0
    given = {name: value for name, value in zip(DATA_FILTERS, filters[1:]) if value is not None}
    # The ETag names the query and the data version it was read at, so a conditional
    # request is answered before any query (the version is at most 0.5 s old: a page can
    # be reported unchanged for that long after a commit).
    version = await request.app.state.data_version.get(pool)
    etag = '"' + hashlib.blake2b(request.scope["query_string"] + version.to_bytes(8) +
                                 scope_tag(), digest_size=16).hexdigest() + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(content=None, status_code=304, headers={"ETag": etag})
    rows, pagination = keyset_page(await data_rows(pool, given, after, limit + 1), limit,
                                   filters)
    return _page(request, rows, pagination, etag)


def _page(request: Request, rows: list[Any], pagination: dict[str, Any],
          etag: str) -> Response[dict[str, Any]]:
    # Encoded from structs (a quarter of the cost of dicts).
    served(request, rows)
    return json_page(request, data_rows_seen(rows, hidden_fields(request)), pagination,
                     {"ETag": etag})


async def _list_as_of(request: Request, pool: Any, as_of: str, filters: tuple[Any, ...],
                      cursor: str | None, limit: int) -> Response[dict[str, Any]]:
    """A /data page as of a moment. The moment is resolved once into a snapshot, which the
    answer gives back (``as_of``) and the cursor is bound to: every page of a walk reads
    the same moment, whatever is written meanwhile. Such a page never changes: its ETag is
    the query's."""
    moment = await versions.resolve(pool, as_of)
    bound = (*filters, moment.snapshot)
    after = decode_cursor(cursor, bound) if cursor else 0
    given = {name: value for name, value in zip(DATA_FILTERS, filters[1:]) if value is not None}
    etag = '"' + hashlib.blake2b(msgspec.json.encode([str(f) for f in bound] + [after, limit])
                                 + scope_tag(), digest_size=16).hexdigest() + '"'
    read = await pool.fetch(as_of_page_sql(tuple(given)), after, limit + 1, moment.snapshot,
                            *given.values())
    versions.check(read[0], moment, filters[1])
    if request.headers.get("if-none-match") == etag:
        return Response(content=None, status_code=304, headers={"ETag": etag})
    rows, pagination = keyset_page([r for r in read if r["id"] is not None], limit, bound)
    pagination["as_of"] = moment.snapshot
    return _page(request, rows, pagination, etag)



@get("/data/{record_id:int}", summary="One record with its lineage", **READ)
async def get_record(
        request: Request,
        record_id: Annotated[int, PathParameter(ge=0, le=db.MAX_ID)],
        as_of: FromQuery[str | None] = None) -> dict[str, Any]:
    """The record, the raw record it came from, and the run that produced it (``as_of``:
    as it was then)."""
    pool = read_pool(request)
    if as_of is None:
        row = await pool.fetchrow(db.query("api", "data_one"), record_id)
    else:
        moment = await versions.resolve(pool, as_of)
        read = await pool.fetchrow(versions.reading_sql("data_one", "$2"), record_id,
                                   moment.snapshot)
        row = read if read["id"] is not None else None
        # Not there then, or purged since (its source is not known then: any source's).
        versions.check(read, moment, None if row is None else row["source"])
    if row is None:
        raise NotFoundException(f"no record {record_id}" + (" then" if as_of else ""))
    record = {k: v for k, v in row.items() if k not in ("ahead", "horizon")}
    hidden = hidden_fields(request)
    concealed = hidden.of(record["source"]) if hidden is not None else frozenset()
    for name in concealed:
        del record[name]
    table = record.pop("raw_table")
    if table not in {k.raw_table for k in KINDS.values()}:
        raise ApiError(500, "internal", "unknown raw table")
    raw = await pool.fetchrow(f"SELECT * FROM {table} WHERE id = $1",
                              record.pop("raw_id"))
    run = await pool.fetchrow(db.query("runs", "get"), record.pop("run_id"))
    served(request, [row])
    # The raw row holds every field as received: not for a caller some are hidden from.
    record["lineage"] = {"raw_table": table,
                         "raw": dict(raw) if raw and not concealed else None,
                         "run": run_view(run) if run else None}
    return envelope(request, record)


class Lineage(msgspec.Struct):
    """What produced a version: its run (``run``: where to read it) and raw row."""

    run_id: int
    run: str
    raw_table: str
    raw_id: int


class Version(msgspec.Struct):
    """One version of a record: its content, when it was valid (the stamps of the
    transactions that wrote and replaced it; ``valid_to`` null: it is the current one) and
    what produced it."""

    record: DataRow
    valid_from: dt.datetime | None
    valid_to: dt.datetime | None
    from_xid: str
    to_xid: str | None
    #: What ended it: ``update``, ``delete``, or null for the current version.
    ended_by: str | None
    lineage: Lineage


@get("/data/{record_id:int}/history", summary="Every version of a record, newest first",
     **READ)
async def record_history(
        request: Request,
        record_id: Annotated[int, PathParameter(ge=0, le=db.MAX_ID,
                                                examples=[Example(value=1)])],
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        cursor: FromQuery[str | None] = None) -> Response[dict[str, Any]]:
    """The record's versions, newest first, each with when it was valid and its lineage
    (the run and the raw row that produced it). A version that the record's deletion ended
    says ``delete`` (a rollback may have brought the record back since). ``next_cursor``
    continues with older versions."""
    pool = read_pool(request)
    before = None
    if cursor:
        before = decode_cursor(cursor, ("history", record_id))
    rows = await pool.fetch(db.query("versions", "history"), record_id,
                            None if before is None else str(before), limit + 1)
    if not rows and before is None:
        raise NotFoundException(f"no record {record_id}, and no version of one")
    out = []
    hidden = hidden_fields(request)
    for i, r in enumerate(rows[:limit]):
        valid_from = r["valid_from"]
        if i + 1 < len(rows) and rows[i + 1]["to_xid"] == r["from_xid"]:
            valid_from = rows[i + 1]["valid_to"]     # see the query
        to_xid = r["to_xid"]
        record = DataRow(*r[:_DATA_COLUMNS])
        if hidden is not None:
            hide(record, hidden.of(record.source))
        out.append(Version(
            record, valid_from, r["valid_to"], str(r["from_xid"]),
            None if to_xid is None else str(to_xid), r["ended_by"],
            Lineage(r["run_id"], f"/etl/runs/{r['run_id']}", r["raw_table"], r["raw_id"])))
    more = len(rows) > limit
    rows = rows[:limit]
    served(request, rows)
    # Older than the page's last version; after the current one (no to_xid): every
    # replaced version (an xid8 reaches 2**63 after 2**32 wraparounds of the 32-bit xid).
    last = rows[-1]["to_xid"]
    nxt = encode_cursor(db.MAX_ID if last is None else int(last), ("history", record_id)) \
        if more else None
    return json_page(request, out, {"limit": limit, "next_cursor": nxt,
                                    "has_more": nxt is not None})


HANDLERS = [list_data, get_record, record_history]
