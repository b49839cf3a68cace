"""Anomalies: a run unlike the source's recent runs is flagged (etl_runs, /health,
/metrics); normal noise raises no alarm."""

from __future__ import annotations

import random

import asyncpg
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app
from etlsvc.runtime.anomalies import score
from tests.conftest import Env, csv_source, run_source


def normal_run(rng: random.Random) -> dict[str, float]:
    rows = max(1, round(rng.gauss(10_000, 300)))
    return {"rows_read": rows, "rows_rejected": round(rows * max(0.0, rng.gauss(0.01, 0.002))),
            "seconds": max(0.1, rng.gauss(12.0, 1.0))}


def test_normal_noise_raises_no_alarm_over_hundreds_of_runs() -> None:
    rng = random.Random(20261130)
    runs = [normal_run(rng) for _ in range(520)]
    alarms = [i for i in range(20, len(runs)) if score(runs[i], runs[i - 20:i], 3.5)]
    assert alarms == []


def test_ten_times_fewer_rows_a_jump_in_rejects_and_a_slow_run_are_flagged() -> None:
    rng = random.Random(7)
    history = [normal_run(rng) for _ in range(20)]
    few = score({"rows_read": 1_000, "rows_rejected": 10, "seconds": 12.0}, history, 3.5)
    assert few is not None and list(few) == ["rows_read"]
    assert few["rows_read"]["score"] < -3.5 and few["rows_read"]["value"] == 1000
    rejects = score({"rows_read": 10_000, "rows_rejected": 800, "seconds": 12.0}, history, 3.5)
    assert rejects is not None and list(rejects) == ["reject_rate"]
    slow = score({"rows_read": 10_000, "rows_rejected": 100, "seconds": 60.0}, history, 3.5)
    assert slow is not None and list(slow) == ["duration_s"]
    # Faster than usual, or fewer rejects than usual, is no alarm.
    assert score({"rows_read": 10_000, "rows_rejected": 0, "seconds": 3.0}, history, 3.5) \
        is None


def test_a_history_of_identical_runs_tolerates_a_wobble_but_not_a_drop() -> None:
    history = [{"rows_read": 5000, "rows_rejected": 0, "seconds": 4.0}] * 10
    assert score({"rows_read": 5100, "rows_rejected": 5, "seconds": 4.2}, history, 3.5) is None
    assert score({"rows_read": 500, "rows_rejected": 0, "seconds": 4.0}, history, 3.5)


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
