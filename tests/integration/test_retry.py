"""Reprocessing rejects: retry under the current rules loads each valid reject exactly once
(raw row, normalized row and status together, even when retries race); ignore; the API."""

from __future__ import annotations

import asyncio
import gzip
import json

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from etlsvc import db
from etlsvc.api.app import create_app
from etlsvc.runtime import retry
from tests.conftest import Env, csv_source, run_source

FIELDS = 'source_id = "id"\ntitle = "title"\namount = "amount"\n'
KEY = {"Authorization": "Bearer test-key"}


def rules(max_amount: int) -> str:
    return f"[sources.rules.amount]\nmax = {max_amount}\n"


def write_items(env: Env, n: int) -> None:
    """n rows; every fourth has an amount of 500, and every tenth an empty title."""
    lines = ["id,title,amount"]
    for i in range(1, n + 1):
        title = "" if i % 10 == 0 else f"Item {i}"
        lines.append(f"k{i},{title},{500 if i % 4 == 0 else i % 100}")
    (env.dir / "items.csv").write_text("\n".join(lines) + "\n")


def config(env: Env, max_amount: int, title_required: bool = False):
    extra = "max_error_rate = 1.0\nbatch_size = 700"
    text = csv_source("items", env.dir / "items.csv", fields=FIELDS, extra=extra)
    text += rules(max_amount)
    if title_required:
        text += "[sources.rules.title]\nrequired = true\n"
    return env.config(text)


async def test_retry_under_a_fixed_rule_loads_each_reject_once_with_its_lineage(
        env: Env, pool: asyncpg.Pool) -> None:
    write_items(env, 2000)
    first = await run_source(config(env, 100, title_required=True), "items")
    # 500 amounts too big, 200 empty titles (100 of which are also too big: one reject each)
    assert first["rows_rejected"] == 500 + 200 - 100
    # The rule is loosened for amounts; titles stay required.
    cfg = config(env, 1000, title_required=True)
    async with db.open_database(cfg) as database:
        row = await retry.retry(database, cfg.source("items"))
    assert row["status"] == "succeeded" and row["trigger"] == "retry"
    assert (row["rows_read"], row["rows_valid"], row["rows_rejected"]) == (600, 400, 200)
    assert row["rows_inserted"] == 400

    statuses = dict(await pool.fetch(
        "SELECT status, count(*) FROM etl_rejects GROUP BY status"))
    assert statuses == {"resolved": 400, "open": 200}
    still = await pool.fetch("SELECT rule, field, reason FROM etl_rejects WHERE status = 'open'")
    assert {(r["rule"], r["field"]) for r in still} == {("required", "title")}
    # Each resolved reject: one raw row and one normalized row, both of the retry run.
    lineage = await pool.fetch(
        "SELECT e.record->>'id' AS key, e.resolved_run_id, n.run_id, r.run_id AS raw_run, "
        "r.line, (e.position->>'line')::int AS reject_line "
        "FROM etl_rejects e JOIN normalized_data n ON n.source_id = e.record->>'id' "
        "JOIN raw_csv_data r ON r.id = n.raw_id WHERE e.status = 'resolved'")
    assert len(lineage) == 400
    for r in lineage:
        assert r["resolved_run_id"] == r["run_id"] == r["raw_run"] == row["id"]
        assert r["line"] == r["reject_line"]
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data") == 1400 + 400
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == 1800

    # A second retry finds nothing new to load.
    async with db.open_database(cfg) as database:
        again = await retry.retry(database, cfg.source("items"))
    assert (again["rows_read"], again["rows_valid"]) == (200, 0)
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data") == 1800


async def test_racing_retries_load_every_reject_exactly_once(
        env: Env, pool: asyncpg.Pool) -> None:
    write_items(env, 4000)
    await run_source(config(env, 100), "items")
    assert await pool.fetchval("SELECT count(*) FROM etl_rejects") == 1000
    cfg = config(env, 1000)
    async with db.open_database(cfg) as database:
        # Three in this process and one in another, all at once.
        cli = asyncio.create_task(asyncio.to_thread(env.cli, "rejects", "retry", "items"))
        rows = await asyncio.gather(*(retry.retry(database, cfg.source("items"), chunk=50)
                                      for _ in range(3)))
        done = await cli
    assert done.returncode == 0, done.stderr
    loaded = sum(r["rows_valid"] for r in rows) + int(
        done.stderr.split(" loaded")[0].rsplit(" ", 1)[-1].replace(",", ""))
    assert loaded == 1000
    assert await pool.fetchval("SELECT count(*) FROM etl_rejects WHERE status = 'resolved'") \
        == 1000
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data") == 4000
    assert await pool.fetchval("SELECT count(DISTINCT source_key) FROM raw_csv_data") == 4000
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == 4000


async def test_ignore_and_retry_by_run_and_by_id_from_the_cli(
        env: Env, pool: asyncpg.Pool) -> None:
    write_items(env, 400)
    first = await run_source(config(env, 100), "items")
    write_items(env, 800)                       # 400 more rows appended: a second run
    second = await run_source(config(env, 100), "items")
    assert first["rows_rejected"] == second["rows_rejected"] == 100
    config(env, 1000)                           # rewrites config.toml with the looser rule
    some = [r["id"] for r in await pool.fetch(
        "SELECT id FROM etl_rejects WHERE run_id = $1 ORDER BY id LIMIT 3", second["id"])]
    done = env.cli("rejects", "retry", "items", "--id", str(some[0]), "--id", str(some[1]))
    assert done.returncode == 0 and "2 loaded (resolved), 0 still open" in done.stderr
    done = env.cli("rejects", "ignore", "items", "--run", str(first["id"]))
    assert done.returncode == 0 and "100 open reject(s) marked ignored" in done.stderr
    done = env.cli("rejects", "retry", "items")
    assert done.returncode == 0 and "98 loaded (resolved)" in done.stderr, done.stderr
    statuses = {(r["run_id"], r["status"]): r["n"] for r in await pool.fetch(
        "SELECT run_id, status, count(*) AS n FROM etl_rejects GROUP BY 1, 2")}
    assert statuses == {(first["id"], "ignored"): 100, (second["id"], "resolved"): 100}
    done = env.cli("rejects", "retry", "nope")
    assert done.returncode == 2 and "unknown source 'nope'" in done.stderr


async def test_retry_of_a_json_lines_source_uses_the_current_mapping(
        env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "events.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(1, 301):
            f.write(json.dumps({"id": f"e{i}", "price": {"value": i}}) + "\n")
    source = """
[[sources]]
name = "events"
kind = "jsonl"
path = "{path}"
max_error_rate = 1.0
[sources.fields]
source_id = "id"
amount = "price.value"
[sources.rules.amount]
max = {max}
"""
    cfg = env.config(source.format(path=path, max=100))
    assert (await run_source(cfg, "events"))["rows_rejected"] == 200
    cfg = env.config(source.format(path=path, max=250))
    async with db.open_database(cfg) as database:
        row = await retry.retry(database, cfg.source("events"))
    assert (row["rows_valid"], row["rows_rejected"]) == (150, 50)
    amounts = await pool.fetch("SELECT amount FROM normalized_data ORDER BY amount")
    assert [int(r["amount"]) for r in amounts] == list(range(1, 251))
    records = await pool.fetch("SELECT record FROM raw_jsonl_data WHERE run_id = $1", row["id"])
    assert len(records) == 150 and all("price" in r["record"] for r in records)


@pytest.fixture
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETLSVC_API_KEYS", "test-key")


async def test_the_api_lists_retries_and_ignores_rejects(
        env: Env, pool: asyncpg.Pool, api_keys: None) -> None:
    write_items(env, 400)
    await run_source(config(env, 100), "items")
    cfg = config(env, 1000)
    async with AsyncTestClient(app=create_app(cfg)) as client:
        r = await client.get("/etl/rejects", params={"source": "items", "status": "open",
                                                     "limit": 1})
        first = r.json()["data"][0]
        assert (first["rule"], first["field"], first["source_field"], first["value"],
                first["status"]) == ("max", "amount", "amount", "500", "open")
        body = {"source": "items", "ids": [first["id"]]}
        assert (await client.post("/etl/rejects/retry", json=body)).status_code == 401
        r = await client.post("/etl/rejects/retry", json=body, headers=KEY)
        assert r.status_code == 200, r.text
        assert (r.json()["data"]["rows_valid"], r.json()["data"]["status"]) == (1, "succeeded")
        r = await client.post("/etl/rejects/ignore", json={"source": "items"}, headers=KEY)
        assert r.json()["data"] == {"source": "items", "ignored": 99}
        r = await client.post("/etl/rejects/retry", json={"source": "nope"}, headers=KEY)
        assert r.status_code == 404
        r = await client.get("/etl/rejects", params={"status": "resolved"})
        assert [x["id"] for x in r.json()["data"]] == [first["id"]]


async def test_retry_of_a_sql_source_and_a_malformed_line_that_keeps_its_reason(
        env: Env, pool: asyncpg.Pool) -> None:
    from tests.integration.test_sql import sql_source

    await pool.execute("CREATE SCHEMA IF NOT EXISTS up_retry; DROP TABLE IF EXISTS "
                       "up_retry.t; CREATE TABLE up_retry.t (id int PRIMARY KEY, name text, "
                       "amount numeric)")
    try:
        await pool.execute("INSERT INTO up_retry.t SELECT g, 'n' || g, g * 10 "
                           "FROM generate_series(1, 40) g")
        source = sql_source("pg", f'url = "{env.database_url}"\ntable = "up_retry.t"\n'
                                  "max_error_rate = 1.0",
                            'source_id = "id"\ntitle = "name"\namount = "amount"')
        csv = env.dir / "items.csv"
        csv.write_text('id,title,amount\nk1,t,5\nk2,"bad"x,7\nk3,t,900\n')
        items = csv_source("items", csv, fields=FIELDS, extra="max_error_rate = 1.0")
        cfg = env.config(source + rules(100) + items + rules(100))
        assert (await run_source(cfg, "pg"))["rows_rejected"] == 30          # 110 … 400
        assert (await run_source(cfg, "items"))["rows_rejected"] == 2
        malformed = await pool.fetchrow(
            "SELECT id, reason FROM etl_rejects WHERE source = 'items' AND rule IS NULL")
        cfg = env.config(source + rules(250) + items + rules(1000))
        async with db.open_database(cfg) as database:
            pg = await retry.retry(database, cfg.source("pg"))
            csv_row = await retry.retry(database, cfg.source("items"))
        assert (pg["rows_valid"], pg["rows_rejected"]) == (15, 15)          # 110 … 250
        assert await pool.fetchval(
            "SELECT count(*) FROM normalized_data WHERE source = 'pg'") == 25
        raw = await pool.fetchval("SELECT record FROM raw_sql_data WHERE run_id = $1 "
                                  "ORDER BY row_number LIMIT 1", pg["id"])
        assert raw == {"id": 11, "name": "n11", "amount": 110}   # the row as the table gave it
        assert (csv_row["rows_valid"], csv_row["rows_rejected"]) == (1, 1)
        after = await pool.fetchrow("SELECT reason, status FROM etl_rejects WHERE id = $1",
                                    malformed["id"])
        assert (after["reason"], after["status"]) == (malformed["reason"], "open")
    finally:
        await pool.execute("DROP SCHEMA up_retry CASCADE")
