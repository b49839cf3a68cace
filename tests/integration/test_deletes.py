"""``deletes = "detect"`` for sources without a log (csv, jsonl, sql, api): keys a whole,
successful read did not see are deleted and show in the change feed; a failed read deletes
nothing; a read that would delete more than ``max_delete_fraction`` deletes nothing and
fails saying so."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Env, api_source, csv_source, run_source
from tests.integration.test_jsonl import jsonl_source
from tests.integration.test_sql import T0, add_pg, orders, sql_source
from tests.upstream import Reply, Upstream

FIELDS = 'source_id = "id"\ntitle = "title"\namount = "amount"'


def write_csv(path: Path, rows: dict[int, str]) -> None:
    path.write_text("id,title,amount\n" + "".join(f"{k},{t},{k}\n" for k, t in rows.items()))


async def keys(pool: asyncpg.Pool, source: str) -> dict[str, str]:
    return {r["source_id"]: r["title"] for r in await pool.fetch(
        "SELECT source_id, title FROM normalized_data WHERE source = $1", source)}


async def tombstones(pool: asyncpg.Pool, source: str) -> set[str]:
    return {r["source_id"] for r in await pool.fetch(
        "SELECT source_id FROM data_tombstones WHERE source = $1", source)}


async def test_a_csv_export_read_whole_deletes_what_it_no_longer_holds(
        env: Env, pool: asyncpg.Pool, tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    write_csv(path, {k: f"item {k}" for k in range(1, 11)})
    cfg = env.config(csv_source("export", path, fields=FIELDS, extra='deletes = "detect"'))
    first = await run_source(cfg, "export")
    assert first["status"] == "succeeded", first["error"]
    assert len(await keys(pool, "export")) == 10
    # Two rows gone, one changed, one new: the file is read whole again.
    write_csv(path, {**{k: f"item {k}" for k in range(1, 9) if k != 4}, 4: "changed",
                     11: "new"})
    run = await run_source(cfg, "export")
    assert run["status"] == "succeeded", run["error"]
    assert run["rows_deleted"] == 2 and run["rows_read"] == 9
    assert await keys(pool, "export") == {
        **{str(k): f"item {k}" for k in range(1, 9) if k != 4}, "4": "changed", "11": "new"}
    assert await tombstones(pool, "export") == {"9", "10"}
    # A read that fails (too many rejects) deletes nothing, whatever it lacks.
    path.write_text("id,title,amount\n1,item 1,1\n" + "".join(
        f"{k},bad,100\n" for k in range(2, 6)))
    bad = env.config(csv_source("export", path, fields=FIELDS, extra='deletes = "detect"\n'
                                '[sources.rules.amount]\nmax = 10'))
    run = await run_source(bad, "export")
    assert run["status"] == "failed" and run["rows_deleted"] == 0
    assert len(await keys(pool, "export")) == 9
    # A read that holds too little (a cut-short export) deletes nothing, and says so.
    write_csv(path, {1: "item 1", 2: "item 2"})
    run = await run_source(cfg, "export")
    assert run["status"] == "failed"
    assert "lacks 7 of the source's 9 rows (78%), over max_delete_fraction (0.5)" \
        in run["error"]
    assert len(await keys(pool, "export")) == 9 and run["rows_deleted"] == 0
    # The operator agrees: it really went.
    agreed = env.config(csv_source("export", path, fields=FIELDS,
                                   extra='deletes = "detect"\nmax_delete_fraction = 0.9'))
    run = await run_source(agreed, "export")
    assert run["status"] == "succeeded", run["error"]
    assert set(await keys(pool, "export")) == {"1", "2"} and run["rows_deleted"] == 7


async def test_a_sql_table_read_whole_deletes_rows_deleted_upstream(
        env: Env, pool: asyncpg.Pool, upstream_pg: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await add_pg(pool, upstream_pg, orders(1, 100, T0))
    monkeypatch.setenv("UPSTREAM_URL", env.database_url)
    cfg = env.config(sql_source("pg", f'url_env = "UPSTREAM_URL"\ntable = "{upstream_pg}.orders"'
                                      '\ndeletes = "detect"'))
    assert (await run_source(cfg, "pg"))["status"] == "succeeded"
    await pool.execute(f"DELETE FROM {upstream_pg}.orders WHERE id % 10 = 0")
    run = await run_source(cfg, "pg")
    assert run["status"] == "succeeded", run["error"]
    assert run["rows_deleted"] == 10
    assert set(await keys(pool, "pg")) == {str(i) for i in range(1, 101) if i % 10}
    assert await tombstones(pool, "pg") == {str(i) for i in range(10, 101, 10)}


async def test_a_jsonl_export_and_an_api_read_whole_delete_what_they_no_longer_hold(
        env: Env, pool: asyncpg.Pool, tmp_path: Path, upstream: Upstream) -> None:
    path = tmp_path / "export.jsonl"
    items = {k: {"id": k, "title": f"item {k}", "amount": k} for k in range(1, 11)}
    body = {"items": list(items.values())}
    upstream.route("/items", lambda r: Reply(body=body["items"]))
    path.write_text("".join(json.dumps(i) + "\n" for i in items.values()))
    cfg = env.config(
        jsonl_source("lines", path, fields=FIELDS, extra='deletes = "detect"')
        + api_source("api", f"{upstream.base}/items", FIELDS, 'deletes = "detect"'))
    for name in ("lines", "api"):
        assert (await run_source(cfg, name))["status"] == "succeeded"
    del items[3], items[7]
    path.write_text("".join(json.dumps(i) + "\n" for i in items.values()))
    body["items"] = list(items.values())
    for name in ("lines", "api"):
        run = await run_source(cfg, name)
        assert run["status"] == "succeeded", run["error"]
        assert run["rows_deleted"] == 2
        assert set(await keys(pool, name)) == {str(k) for k in items}
        assert await tombstones(pool, name) == {"3", "7"}
    # An upstream that fails mid-read deletes nothing.
    upstream.route("/items", lambda r: Reply(503, b"maintenance"))
    run = await run_source(cfg, "api")
    assert run["status"] == "failed" and run["rows_deleted"] == 0
    assert len(await keys(pool, "api")) == 8
