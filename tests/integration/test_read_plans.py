"""Every filter of GET /data is an index scan, whatever the connection ran before.

The equality filters page through (column, id) indexes in id order. For the range filters
the planner chooses per request (the read pool plans each statement for its own values):
a narrow recent window reads its BRIN index; a wide one may walk the primary key.
"""

from __future__ import annotations

import json

import asyncpg
import pytest

from etlsvc.api import data as read_api
from tests.conftest import RECORD_WRITES, Env

#: filter → the index its page must use (kind pages merge its sources' (source, id) ranges)
FILTERS = {
    "source": "normalized_data_source_idx",
    "kind": "normalized_data_source_idx",
    "category": "normalized_data_category_idx",
    "updated_since": "normalized_data_updated_at_brin",
    "event_from": "normalized_data_event_time_brin",
}


@pytest.fixture
async def big_table(pool: asyncpg.Pool) -> None:
    """200,000 rows of a big CSV source and 2,000 of a small RSS one, analysed."""
    await pool.execute("""
        INSERT INTO normalized_data (kind, source, source_id, title, category, event_time,
                                     updated_at, raw_table, raw_id, run_id)
        SELECT CASE WHEN g > 200000 THEN 'rss' ELSE 'csv' END,
               CASE WHEN g > 200000 THEN 'small' ELSE 'big' END,
               'k' || g, 't' || g, 'c' || (g % 1000),
               timestamptz '2020-01-01' + g * interval '1 minute',
               now() - interval '30 days' + g * interval '1 second',   -- as loads write it
               'raw_csv_data', g, 0
        FROM generate_series(1, 202000) g;
        UPDATE normalized_data SET updated_at = now() WHERE id % 10000 = 0;
        ANALYZE normalized_data;
    """)
    await pool.execute(RECORD_WRITES)


def statement(names: tuple[str, ...]) -> str:
    """What a page with these filters runs (a range filter's first statement; a kind page
    of one source)."""
    if names == ("kind",):
        return read_api.data_by_kind_sql(names, 1)
    query = "data_page" if read_api.RANGE_FILTERS.isdisjoint(names) else "data_window"
    return read_api.data_page_sql(names, query)


def arguments(given: dict[str, object]) -> list[object]:
    """The statement's arguments after the cursor and the limit."""
    kind_sources = {"rss": ["small"], "csv": ["big"]}
    return [*given.values(), *(kind_sources[given["kind"]] if "kind" in given else [])]


async def plan(conn: asyncpg.Connection, given: dict[str, object]) -> str:
    sql = statement(tuple(given))
    doc = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, 0, 101, *arguments(given))
    return json.dumps(json.loads(doc) if isinstance(doc, str) else doc)


async def test_each_filter_is_an_index_scan_even_after_many_other_pages(
    env: Env, database_url: str, big_table: None
) -> None:
    import datetime as dt

    recent = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    values = {"source": "small", "kind": "rss", "category": "c3",
              "updated_since": recent,
              # the last ~100 minutes of event times: a narrow window at the highest ids
              "event_from": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
              + dt.timedelta(minutes=202_000 - 100)}
    # The read pool's session settings (app.py), on a connection that has run each
    # statement with other values first: enough times for a generic plan to be tempting.
    conn = await asyncpg.connect(database_url, server_settings={
        "plan_cache_mode": "force_custom_plan", "timezone": "UTC"})
    try:
        for name, index in FILTERS.items():
            sql = statement((name,))
            broad = {"source": "big", "kind": "csv", "category": "c1",
                     "updated_since": dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
                     "event_from": dt.datetime(2000, 1, 1, tzinfo=dt.UTC)}[name]
            for _ in range(8):
                await conn.fetch(sql, 0, 101, *arguments({name: broad}))
            shown = await plan(conn, {name: values[name]})
            assert index in shown, (name, shown)
            assert "Seq Scan" not in shown, (name, shown)
    finally:
        await conn.close()


async def test_range_filtered_pages_are_the_same_rows_whichever_path_they_take(
    env: Env, database_url: str, big_table: None
) -> None:
    import datetime as dt

    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    conn = await asyncpg.connect(database_url, server_settings={"timezone": "UTC"})
    try:
        # narrow (the window query), wide (more than WINDOW_CAP: the primary key walk),
        # and a window closed on both sides, from the start and from a deep cursor
        for given in ({"event_from": start + dt.timedelta(minutes=201_900)},
                      {"event_from": start + dt.timedelta(minutes=10)},
                      {"event_from": start + dt.timedelta(minutes=5_000),
                       "event_to": start + dt.timedelta(minutes=5_300)},
                      {"updated_since": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)}):
            where = " AND ".join(
                {"event_from": "event_time >= ${}", "event_to": "event_time < ${}",
                 "updated_since": "updated_at >= ${}"}[k].format(i)
                for i, k in enumerate(given, 2))
            for after in (0, 150_000):
                got = [r["id"] for r in await read_api.data_rows(conn, given, after, 101)]
                want = [r["id"] for r in await conn.fetch(
                    f"SELECT id FROM normalized_data WHERE id > $1 AND {where} "
                    "ORDER BY id LIMIT 101", after, *given.values())]
                assert got == want, (given, after)
    finally:
        await conn.close()


async def test_kind_pages_are_the_rows_of_that_kind_in_id_order(
    env: Env, database_url: str, big_table: None
) -> None:
    conn = await asyncpg.connect(database_url, server_settings={"timezone": "UTC"})
    try:
        # A source of rows of two kinds (a kind changed in its config) counts for both.
        await conn.execute("UPDATE normalized_data SET kind = 'api' WHERE id % 50000 = 7")
        await conn.execute(RECORD_WRITES)
        for given in ({"kind": "rss"}, {"kind": "csv"}, {"kind": "api"},
                      {"kind": "csv", "category": "c7"}, {"kind": "rss", "category": "c7"}):
            where = " AND ".join(f"{k} = ${i}" for i, k in enumerate(given, 2))
            for after in (0, 150_000, 201_990):
                got = [r["id"] for r in await read_api.data_rows(conn, given, after, 101)]
                want = [r["id"] for r in await conn.fetch(
                    f"SELECT id FROM normalized_data WHERE id > $1 AND {where} "
                    "ORDER BY id LIMIT 101", after, *given.values())]
                assert got == want and (got or after == 201_990), (given, after)
    finally:
        await conn.close()


async def test_a_kind_with_more_sources_than_parts_walks_the_primary_key_alike(
    env: Env, pool: asyncpg.Pool
) -> None:
    sources = read_api.MAX_KIND_PARTS + 8
    await pool.execute(
        "INSERT INTO normalized_data (kind, source, source_id, raw_table, raw_id, run_id) "
        "SELECT CASE WHEN g % 3 = 0 THEN 'csv' ELSE 'api' END, 's' || (g % $1), 'k' || g, "
        "'raw_api_data', g, 0 FROM generate_series(1, 3000) g", sources)
    await pool.execute(RECORD_WRITES)
    for after in (0, 1_500):
        got = [r["id"] for r in await read_api.data_rows(pool, {"kind": "api"}, after, 101)]
        want = [r["id"] for r in await pool.fetch(
            "SELECT id FROM normalized_data WHERE id > $1 AND kind = 'api' ORDER BY id "
            "LIMIT 101", after)]
        assert got == want and len(got) == 101
