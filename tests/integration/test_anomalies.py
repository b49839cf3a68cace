"""Anomalies: a run unlike the source's recent runs is flagged (etl_runs, /health,
/metrics); normal noise raises no alarm."""

from __future__ import annotations

import random

import asyncpg
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app
from tests.conftest import Env, csv_source, run_source


def normal_run(rng: random.Random) -> dict[str, float]:
    rows = max(1, round(rng.gauss(10_000, 300)))
    return {"rows_read": rows, "rows_rejected": round(rows * max(0.0, rng.gauss(0.01, 0.002))),
            "seconds": max(0.1, rng.gauss(12.0, 1.0))}


async def seed_history(pool: asyncpg.Pool, source: str, rows: int, n: int) -> None:
    """n past successful runs of ``source`` reading about ``rows`` rows each."""
    await pool.execute(
        "INSERT INTO etl_runs (source, kind, trigger, status, started_at, finished_at, "
        "rows_read, rows_valid, rows_rejected) "
        "SELECT $1, 'csv', 'schedule', 'succeeded', now() - make_interval(hours => g), "
        "now() - make_interval(hours => g) + interval '1 second', $2 + g % 7, $2 + g % 7, 0 "
        "FROM generate_series(1, $3) g", source, rows, n)


async def test_a_real_run_with_ten_times_fewer_rows_is_flagged_in_runs_health_and_metrics(
        env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "items.csv"
    path.write_text("id,title\n" + "".join(f"k{i},t{i}\n" for i in range(300)))
    cfg = env.config(csv_source("items", path, fields='source_id = "id"\ntitle = "title"\n'))
    await seed_history(pool, "items", 3000, 12)
    run = await run_source(cfg, "items")
    assert run["status"] == "succeeded"
    assert run["anomaly"] is not None and list(run["anomaly"]) == ["rows_read"]
    stored = await pool.fetchval("SELECT anomaly FROM etl_runs WHERE id = $1", run["id"])
    assert stored["rows_read"]["value"] == 300 and stored["rows_read"]["median"] > 3000
    async with AsyncTestClient(app=create_app(cfg)) as client:
        health = (await client.get("/health")).json()["data"]
        assert health["degraded_sources"] == ["items"]
        assert health["sources"]["items"]["anomaly"]["rows_read"]["value"] == 300
        text = (await client.get("/metrics")).text
        assert 'etlsvc_run_anomalies_total{metric="rows_read",source="items"}' in text

    # The same file grown to the usual size: a normal run, and the source is no longer
    # degraded.
    path.write_text("id,title\n" + "".join(f"k{i},t{i}\n" for i in range(3003)))
    again = await run_source(cfg, "items", full_refresh=True)
    assert again["status"] == "succeeded" and again["anomaly"] is None
    async with AsyncTestClient(app=create_app(cfg)) as client:
        assert (await client.get("/health")).json()["data"]["degraded_sources"] == []


async def test_too_little_history_judges_nothing(env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "items.csv"
    path.write_text("id,title\n" + "".join(f"k{i},t{i}\n" for i in range(10)))
    cfg = env.config(csv_source("items", path, fields='source_id = "id"\ntitle = "title"\n'))
    await seed_history(pool, "items", 3000, 4)          # min_runs is 5
    assert (await run_source(cfg, "items"))["anomaly"] is None
