"""Freshness and failing sources are judged on loads, by the database's clock: a reject
retry (a run that reads a handful of rejects) is not a load, and a replica whose clock is
hours off judges a source as the others do."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient

from etlsvc import db
from etlsvc.api.app import create_app
from etlsvc.runtime import retry
from etlsvc.runtime.service import Service
from tests.conftest import Env, csv_source, run_source

FIELDS = 'source_id = "id"\ntitle = "title"\namount = "amount"\n'
KEY = {"Authorization": "Bearer test-key"}
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETLSVC_API_KEYS", "test-key")


async def backdate_loads(pool: asyncpg.Pool, minutes: int) -> None:
    """The source's loads (not its retries) happened ``minutes`` ago."""
    await pool.execute(
        "UPDATE etl_runs SET started_at = started_at - make_interval(mins => $1), "
        "finished_at = finished_at - make_interval(mins => $1) WHERE trigger <> 'retry'",
        minutes)


async def test_a_reject_retry_neither_clears_a_failing_source_nor_makes_it_fresh(
        env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "items.csv"
    path.write_text("id,title,amount\n" + "".join(f"k{i},t{i},{i}\n" for i in range(200))
                    + "k999,bad,N/A\n")
    cfg = env.config(csv_source("items", path, fields=FIELDS, extra='schedule = "1m"'))
    load = await run_source(cfg, "items")
    assert (load["status"], load["rows_rejected"]) == ("succeeded", 1)
    path.unlink()                                     # the next load fails
    failed = await run_source(cfg, "items")
    assert failed["status"] == "failed"
    await backdate_loads(pool, 10)                   # three periods ago and more: stale
    async with db.open_database(cfg) as database:
        again = await retry.retry(database, cfg.source("items"))
    assert (again["trigger"], again["status"], again["rows_read"]) == ("retry", "succeeded", 1)
    success = await pool.fetchval("SELECT finished_at FROM etl_runs WHERE id = $1", load["id"])
    async with AsyncTestClient(app=create_app(cfg)) as client:
        health = (await client.get("/health")).json()["data"]
        items = health["sources"]["items"]
        assert health["failing_sources"] == ["items"]
        assert items["failing"] and items["status"] == "failed"
        assert items["last_run"] == failed["id"]
        assert dt.datetime.fromisoformat(items["last_success"]) == success
        assert items["stale"] and health["status"] == "degraded"
        stats = (await client.get("/stats", headers=KEY)).json()["data"]["sources"]["items"]
        seconds = (load["finished_at"] - load["started_at"]).total_seconds()
        assert stats["last_rows_per_s"] == round(load["rows_read"] / max(seconds, 0.001))
        metrics = (await client.get("/metrics", headers=KEY)).text
        assert 'etlsvc_source_stale{source="items"} 1.0' in metrics
        assert 'etlsvc_source_failing{source="items"} 1.0' in metrics


async def test_a_stale_notification_is_sent_despite_a_later_retry(
        env: Env, pool: asyncpg.Pool, upstream) -> None:
    from tests.upstream import Reply

    upstream.route("/hook", lambda r: Reply(204))
    path = env.dir / "items.csv"
    path.write_text("id,title,amount\nk1,t1,1\nk2,bad,N/A\n")
    cfg = env.config(csv_source("items", path, fields=FIELDS,
                                extra='schedule = "1m"\nmax_error_rate = 1.0'),
                     extra=f'[[notify.webhooks]]\nurl = "{upstream.base}/hook"\n')
    await run_source(cfg, "items")
    await backdate_loads(pool, 10)
    async with db.open_database(cfg) as database:
        await retry.retry(database, cfg.source("items"))
        service = Service(cfg, database, None)   # type: ignore[arg-type]
        await service.announce_stale()
        from etlsvc.runtime import notify
        await notify.drain(database.pool)
    events = [r.headers["x-etlsvc-event"] for r in upstream.requests]
    assert events == ["stale"]


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed "
                    "(Debian package faketime)")
async def test_a_replica_with_a_skewed_clock_judges_freshness_as_the_others(
        env: Env, pool: asyncpg.Pool) -> None:
    from tests.integration.test_service import servers

    path = env.dir / "items.csv"
    path.write_text("id,title,amount\nk1,t1,1\n")
    env.write_config(csv_source("items", path, fields=FIELDS, extra='schedule = "1m"'))
    assert env.cli("run", "items").returncode == 0
    await backdate_loads(pool, 10)                 # stale: three minutes are long past
    behind = {"LD_PRELOAD": str(FAKETIME), "FAKETIME": "-2h",
              "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}
    shown = subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                           env={**os.environ, **behind}, capture_output=True, text=True)
    assert 7000 < time.time() - float(shown.stdout) < 7400      # the process is 2 h behind
    with servers(env, 2, environs=[{}, behind]) as pair:
        judged = []
        for server in pair:
            health = httpx.get(f"{server.base}/health", timeout=10)
            judged.append((health.status_code, health.json()["data"]["sources"]["items"]
                           ["stale"]))
            metrics = httpx.get(f"{server.base}/metrics", headers=KEY, timeout=10).text
            assert 'etlsvc_source_stale{source="items"} 1.0' in metrics, server.port
    assert judged == [(503, True), (503, True)]
