"""Backfills: a range of a source read again as runs of its own, beside the live run,
leaving the live position alone and never overwriting a newer live change."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from etlsvc import db
from etlsvc.errors import BackfillError
from etlsvc.runtime import backfill
from tests.conftest import Env, api_source, csv_source, run_source, shared_workers
from tests.integration.test_api import numbered_items
from tests.integration.test_sql import add_pg, orders, sql_source
from tests.upstream import Reply, Request, Upstream

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


async def run_backfill(cfg: Any, name: str, *, start: str | None = None,
                       end: str | None = None, stream: str | None = None) -> dict[str, Any]:
    """Make (or find) the backfill and run it in this process; its finished row."""
    async with db.open_database(cfg) as database:
        made = await backfill.create(database.pool, cfg.source(name), stream=stream,
                                     start=start, end=end)
        return await backfill.run(database, cfg, cfg.source(name), made["id"],
                                  shared_workers())


def pg_orders(env: Env, schema: str, extra: str = "") -> Any:
    return env.config(sql_source("pg", f'url_env = "UPSTREAM_URL"\ntable = "{schema}.orders"'
                                       f'\ncursor = "updated_at"\nbatch_size = 100{extra}'))


async def test_a_sql_backfill_reloads_its_range_and_leaves_newer_live_rows_and_the_cursor(
    env: Env, pool: asyncpg.Pool, upstream_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_URL", env.database_url)
    # updated_at = T0 + id // 100 seconds: ids 100..399 are the range T0+1s .. T0+3s.
    await add_pg(pool, upstream_pg, orders(1, 1000, T0))
    cfg = pg_orders(env, upstream_pg)
    live = await run_source(cfg, "pg")
    assert live["status"] == "succeeded", live["error"]
    live_state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE source = 'pg'")
    # Fixes made upstream without moving the cursor column: a live run never sees them.
    await pool.execute(f"UPDATE {upstream_pg}.orders SET name = name || ' fixed' "
                       "WHERE id BETWEEN 50 AND 450")
    # Row 250 changed later, and the live side has that (newer) version; the source the
    # backfill reads still answers the older one (a lagging replica): left alone.
    await pool.execute(f"UPDATE {upstream_pg}.orders SET name = 'newer', "
                       "updated_at = updated_at + interval '1 hour' WHERE id = 250")
    again = await run_source(cfg, "pg")
    assert again["rows_updated"] == 1
    await pool.execute(f"UPDATE {upstream_pg}.orders SET name = 'older', "
                       f"updated_at = '{T0 + dt.timedelta(seconds=2)}' WHERE id = 250")
    live_state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE source = 'pg'")

    row = await run_backfill(cfg, "pg", start=str(T0 + dt.timedelta(seconds=1)),
                             end=str(T0 + dt.timedelta(seconds=3)))
    assert row["status"] == "succeeded", row["error"]
    names = dict(await pool.fetch("SELECT source_id::int, title FROM normalized_data"))
    assert all(names[i] == f"order {i} fixed" for i in range(100, 400) if i != 250)
    assert names[250] == "newer"                      # the newer live change stays
    assert names[99] == "order 99" and names[400] == "order 400"   # outside the range
    progress = row["progress"]
    assert (progress["rows_read"], progress["rows_updated"], progress["rows_unchanged"]) == \
        (300, 299, 1)
    assert progress["fraction"] == 1.0
    # The live cursor did not move, and the backfill's checkpoints are its own.
    assert await pool.fetchval(
        "SELECT state FROM etl_checkpoints WHERE source = 'pg'") == live_state
    assert await pool.fetchval("SELECT count(*) FROM etl_checkpoints WHERE source = $1",
                               f"pg#backfill:{row['id']}") == 1
    run = await pool.fetchrow("SELECT trigger, status FROM etl_runs WHERE id = $1",
                              row["run_id"])
    assert tuple(run) == ("backfill", "succeeded")
    # Asked again, the same range is a new backfill (the last one is over).
    second = await run_backfill(cfg, "pg", start=str(T0 + dt.timedelta(seconds=1)),
                                end=str(T0 + dt.timedelta(seconds=3)))
    assert second["id"] != row["id"] and second["progress"]["rows_unchanged"] == 300


async def fill_orders(pool: asyncpg.Pool, schema: str, n: int) -> None:
    """``n`` orders, updated_at = T0 + id seconds."""
    await pool.execute(
        f"INSERT INTO {schema}.orders SELECT i, 'order ' || i, i / 4.0, "
        "$1::timestamptz + make_interval(secs => i) FROM generate_series(1, $2) i", T0, n)


async def test_backfill_over_http_beside_the_live_run_with_its_errors_and_cancel(
    env: Env, pool: asyncpg.Pool, upstream_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from litestar.testing import AsyncTestClient

    from etlsvc.api.app import create_app

    monkeypatch.setenv("UPSTREAM_URL", env.database_url)
    monkeypatch.setenv("ETLSVC_API_KEYS", "test-key")
    key = {"Authorization": "Bearer test-key"}
    await fill_orders(pool, upstream_pg, 60_000)
    cfg = env.config(sql_source("pg", f'url_env = "UPSTREAM_URL"\ntable = "{upstream_pg}.orders"'
                                      '\ncursor = "updated_at"\nbatch_size = 500') +
                     '[[sources]]\nname = "feed"\nkind = "rss"\nurls = ["http://127.0.0.1:9/"]\n')
    async with AsyncTestClient(app=create_app(cfg)) as client:
        assert (await client.post("/etl/backfill", json={"source": "pg"})).status_code == 401
        rss = await client.post("/etl/backfill", json={"source": "feed"}, headers=key)
        assert rss.status_code == 422 and rss.json()["error"]["code"] == "no_backfill"
        backwards = await client.post("/etl/backfill", headers=key, json={
            "source": "pg", "from": "2024-06-01", "to": "2024-05-01"})
        assert backwards.status_code == 422, backwards.text
        # The live run and a backfill of the whole range at once.
        live = await client.post("/etl/run", json={"sources": ["pg"]}, headers=key)
        assert live.status_code == 202
        made = await client.post("/etl/backfill", json={"source": "pg"}, headers=key)
        assert made.status_code == 202, made.text
        bf = made.json()["data"]
        other = await client.post("/etl/backfill", headers=key,
                                  json={"source": "pg", "from": "1"})
        assert other.status_code == 409 and other.json()["error"]["code"] == "backfill_open"
        # The same range again is the same backfill.
        same = await client.post("/etl/backfill", json={"source": "pg"}, headers=key)
        assert same.json()["data"]["id"] == bf["id"]
        deadline = time.monotonic() + 120
        while True:
            row = (await client.get(f"/etl/backfill/{bf['id']}")).json()["data"]
            if row["status"] not in ("pending", "running") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert row["status"] == "succeeded", row
        assert row["progress"]["rows_read"] == 60_000 and row["progress"]["fraction"] == 1.0
        listed = (await client.get("/etl/backfill", params={"source": "pg"})).json()["data"]
        assert [b["id"] for b in listed] == [bf["id"]]
        cancel = await client.post(f"/etl/backfill/{bf['id']}/cancel", headers=key)
        assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "backfill_over"
        missing = await client.get("/etl/backfill/999999")
        assert missing.status_code == 404
    runs = await pool.fetch("SELECT trigger, status, started_at, finished_at FROM etl_runs "
                            "ORDER BY id")
    assert [(r["trigger"], r["status"]) for r in runs] == [
        ("manual", "succeeded"), ("backfill", "succeeded")]
    # They ran at the same time: the backfill started before the live run ended.
    assert runs[1]["started_at"] < runs[0]["finished_at"]
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == 60_000


async def many_orders(env: Env, pool: asyncpg.Pool, schema: str, n: int) -> None:
    """``n`` orders upstream, and a config whose source ``pg`` reads them by updated_at in
    batches of 1,000 (its URL in the file: the CLI and ``serve`` run without the test's
    environment)."""
    await fill_orders(pool, schema, n)
    env.write_config(sql_source("pg", f'url = "{env.database_url}"\ntable = "{schema}.orders"'
                                      '\ncursor = "updated_at"\nbatch_size = 1000'))


def backfill_cli(env: Env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "backfill", *args, "--config",
         str(env.dir / "config.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.dir,
        env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url})


async def wait_for_rows(pool: asyncpg.Pool, at_least: int, timeout: float = 60) -> int:
    """The rows the open backfill's current run has committed, once at least ``at_least``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = await pool.fetchval(
            "SELECT r.rows_read FROM etl_backfills b JOIN etl_runs r ON r.id = b.run_id "
            "WHERE b.status = 'running'")
        if done is not None and done >= at_least:
            return done
        await asyncio.sleep(0.05)
    raise AssertionError("the backfill did not get going")


async def test_a_killed_backfill_goes_on_where_it_stopped_and_a_cancelled_one_ends(
    env: Env, pool: asyncpg.Pool, upstream_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 100_000
    await many_orders(env, pool, upstream_pg, n)
    start, end = str(T0 + dt.timedelta(seconds=1)), str(T0 + dt.timedelta(seconds=n))
    first = backfill_cli(env, "pg", "--from", start, "--to", end)
    done = await wait_for_rows(pool, 10_000)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    [bf] = await pool.fetch("SELECT * FROM etl_backfills")
    assert bf["status"] == "running"            # its process is gone: it goes on when asked
    # Asked again (the same range): the same backfill, from its checkpoint.
    again = backfill_cli(env, "pg", "--from", start, "--to", end)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"backfill {bf['id']} of pg" in err and "goes on where it stopped" in err
    row = await pool.fetchrow("SELECT * FROM etl_backfills WHERE id = $1", bf["id"])
    assert row["status"] == "succeeded" and len(row["runs"]) == 2
    runs = await pool.fetch("SELECT status, rows_read FROM etl_runs WHERE id = ANY($1) "
                            "ORDER BY id", row["runs"])
    assert runs[0]["status"] == "interrupted" and runs[0]["rows_read"] >= done
    # Every row of the range read once over the two runs: whole batches, none twice.
    assert sum(r["rows_read"] for r in runs) == n == row["progress"]["rows_read"]
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == n

    # A cancel stops a running backfill within a second or two; what it committed stays.
    third = backfill_cli(env, "pg", "--from", start, "--to", end)
    await wait_for_rows(pool, 10_000)
    [running] = await pool.fetch("SELECT id FROM etl_backfills WHERE status = 'running'")
    asked = time.monotonic()
    cancelled = await backfill.cancel(pool, running["id"])     # as --cancel and the POST do
    assert cancelled["cancel"] and cancelled["status"] == "running"
    third.communicate(timeout=60)
    assert third.returncode == 1 and time.monotonic() - asked < 10
    row = await pool.fetchrow("SELECT * FROM etl_backfills WHERE id = $1", running["id"])
    assert row["status"] == "cancelled" and 0 < row["progress"]["rows_read"] < n
    assert "cancelled by the operator" in row["error"]
    listed = env.cli("backfill", "--list", "pg")
    assert f"backfill {running['id']} of pg" in listed.stdout and "cancelled" in listed.stdout
    again = env.cli("backfill", "--cancel", str(running["id"]))
    assert again.returncode == 1 and "is cancelled already" in again.stderr


async def backfill_held_while(pool: asyncpg.Pool, cfg: Any, name: str, stream: str,
                              meanwhile: Callable[[], Awaitable[dict[str, Any]]],
                              **bounds: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a backfill of ``name`` whose first batch, once read (its snapshot taken), is held
    before its checkpoint (a row of the same key, inserted and not committed here) while
    ``meanwhile`` runs (changes at the source, and the live run that applies them first),
    then let it finish. (what meanwhile returned, the backfill's row)."""
    async with db.open_database(cfg) as database:
        made = await backfill.create(database.pool, cfg.source(name), stream=None, **bounds)
    async with pool.acquire() as holder:
        hold = holder.transaction()
        await hold.start()
        try:
            await holder.execute("INSERT INTO etl_checkpoints (source, stream, state, run_id) "
                                 "VALUES ($1, $2, '{}', 0)", f"{name}#backfill:{made['id']}",
                                 stream)
            task = asyncio.create_task(run_backfill(cfg, name, **bounds))
            deadline = time.monotonic() + 60
            while not await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO etl_checkpoints%'"):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            live = await meanwhile()
        finally:
            await hold.rollback()              # the backfill goes on
    return live, await task


async def assert_backfill_left_alone(cfg: Any, pool: asyncpg.Pool, raw_table: str,
                                     newer: str, deleted: str) -> None:
    """The backfill left the row changed after its read alone and did not bring back the
    one deleted after it; it kept neither of its stale records in the raw table (it keeps
    the others), so that a replay of the source keeps both changes too."""
    from etlsvc.runtime import replay

    def titles() -> Awaitable[list[asyncpg.Record]]:
        return pool.fetch("SELECT source_id, title FROM normalized_data WHERE source_id = "
                          "ANY($1)", [newer, deleted])

    assert dict(await titles()) == {newer: "newer"}
    kept = {r["source_key"] for r in await pool.fetch(
        f"SELECT source_key FROM {raw_table} WHERE snapshot < 0 AND source_key = ANY($1)",
        [newer, deleted, "1"])}
    assert kept == {"1"}
    name = await pool.fetchval("SELECT source FROM etl_backfills LIMIT 1")
    async with db.open_database(cfg) as database:
        replayed = await replay.replay_source(database, cfg.source(name))
    assert replayed["status"] == "succeeded", replayed["error"]
    assert dict(await titles()) == {newer: "newer"}


async def test_a_file_backfill_reads_again_the_files_modified_in_its_dates(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    folder = tmp_path / "drops"
    folder.mkdir()
    for day in (1, 2, 3):
        path = folder / f"day{day}.csv"
        path.write_text("id,title\n" + "".join(f"{day}-{i},row {day}-{i}\n" for i in range(500)))
        stamp = dt.datetime(2024, 5, day, 12, tzinfo=dt.UTC).timestamp()
        os.utime(path, (stamp, stamp))
    cfg = env.config(csv_source("drops", folder / "day*.csv", fields='source_id = "id"\n'
                                'title = "title"', extra="batch_size = 100"))
    assert (await run_source(cfg, "drops"))["rows_inserted"] == 1500
    live = await pool.fetch("SELECT stream, state FROM etl_checkpoints ORDER BY stream")
    await pool.execute("UPDATE normalized_data SET title = 'damaged'")
    bad = env.cli("backfill", "drops", "--from", "2024-05-03", "--to", "2024-05-01")
    assert bad.returncode == 1 and "--from 2024-05-03 is after --to 2024-05-01" in bad.stderr
    bad = env.cli("backfill", "drops", "--from", "May 2nd")
    assert bad.returncode == 1 and "--from/--to: " in bad.stderr

    row = await run_backfill(cfg, "drops", start="2024-05-02", end="2024-05-02")
    assert row["status"] == "succeeded", row["error"]
    assert (row["progress"]["rows_read"], row["progress"]["rows_updated"]) == (500, 500)
    titles = {r["title"] for r in await pool.fetch(
        "SELECT title FROM normalized_data WHERE source_id LIKE '2-%'")}
    assert titles == {f"row 2-{i}" for i in range(500)}
    assert await pool.fetchval("SELECT count(*) FROM normalized_data "
                               "WHERE title = 'damaged'") == 1000
    # A time range: from noon of the 3rd on.
    row = await run_backfill(cfg, "drops", start="2024-05-03T12:00:00")
    assert row["progress"]["rows_updated"] == 500
    assert await pool.fetch("SELECT stream, state FROM etl_checkpoints WHERE source = 'drops' "
                            "ORDER BY stream") == live
    # A range no file was modified in reads nothing, and says so.
    empty = await run_backfill(cfg, "drops", start="2025-01-01")
    assert empty["status"] == "succeeded" and empty["progress"]["rows_read"] == 0
    notes = await pool.fetchval("SELECT notes FROM etl_runs WHERE id = $1", empty["run_id"])
    assert "no file of" in notes["warnings"][0]


async def test_an_api_backfill_reads_its_page_range_only(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    items = numbered_items(100)

    def by_page(r: Request) -> Reply:
        page = int(r.query["page"])
        return Reply(body={"data": items[(page - 1) * 10: page * 10]})

    def linked(r: Request) -> Reply:
        page = int(r.query.get("p", "1"))
        more = page * 10 < len(items)
        return Reply(body={"data": items[(page - 1) * 10: page * 10],
                           "next": f"{upstream.base}/linked?p={page + 1}" if more else None})

    upstream.route("/paged", by_page)
    upstream.route("/linked", linked)
    fields = 'source_id = "id"\ntitle = "name"'
    cfg = env.config(
        api_source("paged", f"{upstream.base}/paged", fields,
                   'items_path = "data"\n[sources.pagination]\nstyle = "page"\npage_size = 10\n')
        + api_source("linked", f"{upstream.base}/linked", fields,
                     'items_path = "data"\n[sources.pagination]\nstyle = "next_url"\n'
                     'next_url_path = "next"\n'))
    for name in ("paged", "linked"):
        assert (await run_source(cfg, name))["rows_inserted"] == 100
    live = await pool.fetch("SELECT source, stream, state FROM etl_checkpoints ORDER BY 1")
    await pool.execute("UPDATE normalized_data SET title = 'damaged'")
    upstream.requests.clear()

    paged = await run_backfill(cfg, "paged", start="3", end="5")
    assert paged["status"] == "succeeded", paged["error"]
    # Straight to page 3 (the page style can ask for it), and not past page 5.
    assert [r.query["page"] for r in upstream.requests] == ["3", "4", "5"]
    upstream.requests.clear()
    linked = await run_backfill(cfg, "linked", start="3", end="5")
    assert linked["status"] == "succeeded", linked["error"]
    # next_url can only be followed: pages 1 and 2 are read, not loaded.
    assert [r.query.get("p", "1") for r in upstream.requests] == ["1", "2", "3", "4", "5"]
    for name, row in (("paged", paged), ("linked", linked)):
        assert (row["progress"]["rows_read"], row["progress"]["rows_updated"]) == (30, 30)
        repaired = [r["source_id"] for r in await pool.fetch(
            "SELECT source_id FROM normalized_data WHERE source = $1 AND title <> 'damaged' "
            "ORDER BY source_id", name)]
        assert repaired == [items[i]["id"] for i in range(20, 50)]
    assert await pool.fetch("SELECT source, stream, state FROM etl_checkpoints "
                            "WHERE source NOT LIKE '%#backfill:%' ORDER BY 1") == live
    with pytest.raises(BackfillError, match="not a range of pages"):
        await run_backfill(cfg, "paged", start="5", end="3")
    with pytest.raises(BackfillError, match="are page numbers"):
        await run_backfill(cfg, "paged", start="first")


async def test_the_service_takes_up_a_backfill_whose_process_was_killed(
    env: Env, pool: asyncpg.Pool, upstream_pg: str
) -> None:
    from tests.integration.test_service import servers

    n = 100_000
    await many_orders(env, pool, upstream_pg, n)
    key = {"ETLSVC_API_KEYS": "k"}
    with servers(env, 1, [key]) as [first]:
        made = httpx.post(f"{first.base}/etl/backfill", json={"source": "pg"},
                          headers={"Authorization": "Bearer k"}, timeout=10)
        assert made.status_code == 202, made.text
        await wait_for_rows(pool, 10_000)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    bf = made.json()["data"]["id"]
    with servers(env, 1, [key]) as [second]:
        # Taken up at start (the sweep), from its checkpoint, by the new process.
        deadline = time.monotonic() + 120
        while (row := httpx.get(f"{second.base}/etl/backfill/{bf}").json()["data"])[
                "status"] == "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    assert row["status"] == "succeeded", row
    runs = await pool.fetch("SELECT status, rows_read FROM etl_runs WHERE id = ANY($1) "
                            "ORDER BY id", row["runs"])
    assert [r["status"] for r in runs] == ["interrupted", "succeeded"]
    assert sum(r["rows_read"] for r in runs) == n == row["progress"]["rows_read"]
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == n
