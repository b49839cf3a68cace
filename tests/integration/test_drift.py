"""Schema drift: a new, missing or retyped column is seen when it first appears, and the
source's policy decides what happens (evolve, freeze, discard_row, discard_value)."""

from __future__ import annotations

import gzip
import json

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app
from tests.conftest import Env, csv_source, run_source

FIELDS = 'source_id = "id"\ntitle = "title"\n'


def first_file(env: Env) -> None:
    (env.dir / "items.csv").write_text(
        "id,title,size,note\n" + "".join(f"k{i},t{i},{i},n\n" for i in range(100)))


def second_file(env: Env) -> None:
    """`note` gone, `color` new (set on even rows), `size` text on every third row."""
    rows = [f"k{i},t{i},{'XL' if i % 3 == 0 else i},{'red' if i % 2 == 0 else ''}\n"
            for i in range(100, 200)]
    (env.dir / "items.csv").write_text("id,title,size,color\n" + "".join(rows))


def config(env: Env, policy: str):
    return env.config(csv_source("items", env.dir / "items.csv", fields=FIELDS,
                                 extra=f'schema_drift = "{policy}"\nmax_error_rate = 1'))


CHANGES = [
    {"stream": "", "change": "new", "column": "color", "type": "text"},
    {"stream": "", "change": "missing", "column": "note", "type": "text"},
    {"stream": "", "change": "retyped", "column": "size", "type": "text", "was": "number"},
]


async def test_evolve_loads_everything_warns_once_and_accepts_the_new_shape(
        env: Env, pool: asyncpg.Pool) -> None:
    first_file(env)
    cfg = config(env, "evolve")
    first = await run_source(cfg, "items")
    assert "drift" not in first["notes"]           # the first run sets the shape
    second_file(env)
    run = await run_source(cfg, "items", full_refresh=True)
    assert run["status"] == "succeeded" and run["rows_valid"] == 100
    stream = str((env.dir / "items.csv").resolve())
    assert sorted(run["notes"]["drift"], key=lambda c: c["change"]) == [
        {**c, "stream": stream} for c in sorted(CHANGES, key=lambda c: c["change"])]
    raw = await pool.fetchval("SELECT record FROM raw_csv_data WHERE source_key = 'k100'")
    assert raw == {"id": "k100", "title": "t100", "size": "100", "color": "red"}
    async with AsyncTestClient(app=create_app(cfg)) as client:
        stats = (await client.get("/stats")).json()["data"]["sources"]["items"]
        assert {c["column"] for c in stats["schema_drift"]} == {"color", "note", "size"}
        text = (await client.get("/metrics")).text
        assert 'etlsvc_schema_drift_total{change="new",source="items"}' in text
    # Accepted: the same shape again is no drift.
    again = await run_source(cfg, "items", full_refresh=True)
    assert "drift" not in again["notes"]


async def test_freeze_fails_the_run_before_loading_and_again_until_accepted(
        env: Env, pool: asyncpg.Pool) -> None:
    first_file(env)
    cfg = config(env, "freeze")
    await run_source(cfg, "items")
    second_file(env)
    for _ in range(2):
        run = await run_source(cfg, "items", full_refresh=True)
        assert run["status"] == "failed"
        assert 'schema drift (schema_drift = "freeze")' in run["error"]
        assert "new column 'color' (text)" in run["error"]
        assert "column 'size' changed type from number to text" in run["error"]
        assert await pool.fetchval(
            "SELECT count(*) FROM raw_csv_data WHERE source_key = 'k100'") == 0


@pytest.mark.parametrize("policy", ["discard_row", "discard_value"])
async def test_discard_policies_drop_the_rows_or_the_values_that_drifted(
        env: Env, pool: asyncpg.Pool, policy: str) -> None:
    first_file(env)
    cfg = config(env, policy)
    await run_source(cfg, "items")
    second_file(env)
    run = await run_source(cfg, "items", full_refresh=True)
    assert run["status"] == "succeeded"
    drifted = {i for i in range(100, 200) if i % 2 == 0 or i % 3 == 0}   # color or text size
    if policy == "discard_row":
        assert run["rows_rejected"] == len(drifted)
        rejects = await pool.fetch("SELECT record->>'id' AS id, rule, reason FROM etl_rejects")
        assert {r["id"] for r in rejects} == {f"k{i}" for i in drifted}
        assert {r["rule"] for r in rejects} == {"drift"}
        assert all('schema_drift = "discard_row"' in r["reason"] for r in rejects)
        raw = await pool.fetchval("SELECT record FROM raw_csv_data WHERE source_key = 'k101'")
        assert raw == {"id": "k101", "title": "t101", "size": "101", "color": ""}
    else:
        assert run["rows_rejected"] == 0 and run["rows_valid"] == 100
        raw = {r["source_key"]: r["record"] for r in await pool.fetch(
            "SELECT source_key, record FROM raw_csv_data WHERE run_id = $1", run["id"])}
        # The new column leaves every record; a text size is blanked.
        assert raw["k102"] == {"id": "k102", "title": "t102", "size": ""}
        assert raw["k101"] == {"id": "k101", "title": "t101", "size": "101"}
    # Not accepted: the next run finds the same drift.
    again = await run_source(cfg, "items", full_refresh=True)
    assert {c["column"] for c in again["notes"]["drift"]} == {"color", "note", "size"}


async def test_json_lines_keys_new_and_retyped_under_discard_value(
        env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "events.jsonl.gz"

    def write(records: list[dict]) -> None:
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    source = csv_source("events", path, fields='source_id = "id"\ntitle = "name"\n',
                        extra='schema_drift = "discard_value"').replace('kind = "csv"',
                                                                       'kind = "jsonl"')
    cfg = env.config(source)
    write([{"id": f"e{i}", "name": "n", "qty": i} for i in range(50)])
    await run_source(cfg, "events")
    write([{"id": f"e{i}", "name": "n", "qty": "many" if i % 2 else i, "extra": {"a": 1}}
           for i in range(50, 100)])
    run = await run_source(cfg, "events", full_refresh=True)
    assert {(c["change"], c["column"], c["type"]) for c in run["notes"]["drift"]} == {
        ("new", "extra", "object"), ("retyped", "qty", "number|string")}
    raw = {r["source_key"]: r["record"] for r in await pool.fetch(
        "SELECT source_key, record FROM raw_jsonl_data WHERE run_id = $1", run["id"])}
    assert raw["e50"] == {"id": "e50", "name": "n", "qty": 50}      # no extra
    assert raw["e51"] == {"id": "e51", "name": "n"}                 # no extra, no "many"


async def test_a_batch_without_records_is_no_drift_even_under_freeze(
        env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "events.jsonl"
    source = csv_source("events", path, fields='source_id = "id"\ntitle = "name"\n',
                        extra='schema_drift = "freeze"\nmax_error_rate = 1').replace(
                            'kind = "csv"', 'kind = "jsonl"')
    cfg = env.config(source)
    path.write_text("".join(json.dumps({"id": f"e{i}", "name": "n"}) + "\n" for i in range(5)))
    await run_source(cfg, "events")
    with open(path, "a") as f:                  # appended: only lines that are not records
        f.write("not json\n[1, 2]\n")
    run = await run_source(cfg, "events")
    assert run["status"] == "succeeded", run["error"]
    assert (run["rows_read"], run["rows_rejected"]) == (2, 2)
    assert "drift" not in run["notes"]
