"""Webhooks, received by a real HTTP server on 127.0.0.1: a failed run, an anomaly and a
stale source are announced once, signed with HMAC-SHA256, retried with backoff."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time

import asyncpg
import pytest

from etlsvc import db
from etlsvc.config import load_config
from etlsvc.errors import ConfigError
from etlsvc.runtime import notify
from etlsvc.runtime.service import Service
from tests.conftest import Env, csv_source, run_source
from tests.upstream import Reply, Request, Upstream

SECRET = "s3cret-never-sent"
FIELDS = 'source_id = "id"\ntitle = "title"\n'


def hooks(url: str, extra: str = "") -> str:
    return f"""
[[notify.webhooks]]
url = "{url}"
secret_env = "ETLSVC_HOOK_SECRET"
backoff_s = 0.05
{extra}
"""


def verify(req: Request) -> dict:
    """The payload, once its signature checks out under the secret."""
    stamp = req.headers["x-etlsvc-timestamp"]
    assert abs(int(stamp) - time.time()) < 60
    expected = hmac.new(SECRET.encode(), stamp.encode() + b"." + req.body,
                        hashlib.sha256).hexdigest()
    assert req.headers["x-etlsvc-signature"] == f"sha256={expected}"
    assert SECRET not in req.body.decode()
    return json.loads(req.body)


async def test_a_failed_run_of_the_cli_is_announced_signed_after_retries(
        env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    answers = iter([Reply(503), Reply(500), Reply(204)])
    upstream.route("/hook", lambda r: next(answers))
    env.write_config(csv_source("items", env.dir / "missing.csv", fields=FIELDS),
                     extra=hooks(f"{upstream.base}/hook"))
    done = env.cli("run", "items", ETLSVC_HOOK_SECRET=SECRET)
    assert done.returncode == 1
    posts = [r for r in upstream.requests if r.method == "POST"]
    assert len(posts) == 3                              # 503, 500, then delivered
    payload = verify(posts[-1])
    run_id = await pool.fetchval("SELECT id FROM etl_runs WHERE source = 'items'")
    assert payload["event"] == "run_failed" and payload["run_id"] == run_id
    assert payload["source"] == "items" and "missing.csv" in payload["summary"]
    assert payload["details"]["error"] and payload["details"]["rows_read"] == 0
    assert posts[-1].headers["x-etlsvc-event"] == "run_failed"
    assert posts[-1].headers["x-etlsvc-delivery"] == str(payload["id"])
    assert [verify(p)["id"] for p in posts] == [payload["id"]] * 3    # one event, retried
    row = await pool.fetchrow("SELECT event, outcomes FROM etl_notifications")
    assert (row["event"], row["outcomes"]) == ("run_failed", ["delivered after 3 attempt(s)"])
    assert SECRET not in done.stdout + done.stderr


async def test_an_anomaly_goes_to_a_slack_hook_and_a_4xx_is_not_retried(
        env: Env, pool: asyncpg.Pool, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETLSVC_HOOK_SECRET", SECRET)
    upstream.route("/slack", lambda r: Reply(200, b"ok"))
    upstream.route("/gone", lambda r: Reply(410))
    path = env.dir / "items.csv"
    path.write_text("id,title\n" + "".join(f"k{i},t{i}\n" for i in range(100)))
    cfg = load_config(env.write_config(
        csv_source("items", path, fields=FIELDS),
        extra=hooks(f"{upstream.base}/slack", 'format = "slack"\nevents = ["anomaly"]')
        + hooks(f"{upstream.base}/gone", 'events = ["anomaly", "run_failed"]')),
        environ={"ETLSVC_HOOK_SECRET": SECRET})
    await pool.execute(
        "INSERT INTO etl_runs (source, kind, trigger, status, started_at, finished_at, "
        "rows_read) SELECT 'items', 'csv', 'schedule', 'succeeded', now() - interval '1 day', "
        "now() - interval '1 day' + interval '1 second', 2000 + g FROM generate_series(1, 8) g")
    run = await run_source(cfg, "items")
    assert run["anomaly"]                       # run_source waited for its deliveries
    slack = [r for r in upstream.requests if r.path == "/slack"]
    gone = [r for r in upstream.requests if r.path == "/gone"]
    assert len(slack) == 1 and len(gone) == 1
    text = verify(slack[0])["text"]
    assert text.startswith("etlsvc anomaly: items: run ") and "rows_read 100.0" in text
    outcomes = await pool.fetchval("SELECT outcomes FROM etl_notifications")
    assert outcomes == ["delivered after 1 attempt(s)", "failed after 1 attempt(s): HTTP 410"]


async def test_a_stale_source_is_announced_once_however_often_it_is_swept(
        env: Env, pool: asyncpg.Pool, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETLSVC_HOOK_SECRET", SECRET)
    upstream.route("/hook", lambda r: Reply(200))
    cfg = load_config(env.write_config(
        csv_source("items", env.dir / "x.csv", fields=FIELDS, extra='schedule = "1m"')
        + csv_source("fresh", env.dir / "y.csv", fields=FIELDS, extra='schedule = "1m"'),
        extra=hooks(f"{upstream.base}/hook")), environ={"ETLSVC_HOOK_SECRET": SECRET})
    success = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    for source, finished in (("items", success), ("fresh", dt.datetime.now(dt.UTC))):
        await pool.execute(
            "INSERT INTO etl_runs (source, kind, trigger, status, started_at, finished_at) "
            "VALUES ($1, 'csv', 'schedule', 'succeeded', $2, $2)", source, finished)
    async with db.open_database(cfg) as database:
        service = Service(cfg, database, None)   # type: ignore[arg-type]
        for _ in range(3):                      # three sweeps (or three replicas)
            await service.announce_stale()
        await notify.drain(database.pool)
    posts = [verify(r) for r in upstream.requests]
    assert [(p["event"], p["source"]) for p in posts] == [("stale", "items")]
    assert posts[0]["details"]["last_success"] == success.isoformat()


def test_a_webhook_secret_missing_from_the_environment_is_a_config_error(env: Env) -> None:
    path = env.write_config(csv_source("items", env.dir / "x.csv", fields=FIELDS),
                            extra=hooks("http://127.0.0.1:9/hook"))
    with pytest.raises(ConfigError, match=r"key 'notify\.webhooks\[0\]\.secret_env': "
                                          r"environment variable ETLSVC_HOOK_SECRET is not set"):
        load_config(path, environ={})
    done = env.cli("check")
    assert done.returncode == 2 and "ETLSVC_HOOK_SECRET is not set" in done.stderr


async def test_schema_drift_is_announced_once_per_run(
        env: Env, pool: asyncpg.Pool, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETLSVC_HOOK_SECRET", SECRET)
    upstream.route("/hook", lambda r: Reply(200))
    path = env.dir / "items.csv"
    path.write_text("id,title\n" + "".join(f"k{i},t{i}\n" for i in range(50)))
    cfg = load_config(env.write_config(
        csv_source("items", path, fields=FIELDS, extra="batch_size = 10"),
        extra=hooks(f"{upstream.base}/hook", 'events = ["drift"]')),
        environ={"ETLSVC_HOOK_SECRET": SECRET})
    await run_source(cfg, "items")
    path.write_text("id,title,color\n" + "".join(f"k{i},t{i},red\n" for i in range(50)))
    run = await run_source(cfg, "items", full_refresh=True)      # five batches, one event
    posts = [verify(r) for r in upstream.requests]
    assert [(p["event"], p["run_id"]) for p in posts] == [("drift", run["id"])]
    assert posts[0]["details"]["policy"] == "evolve"
    assert [c["column"] for c in posts[0]["details"]["changes"]] == ["color"]
    assert "new column 'color'" in posts[0]["summary"]


TRICKLE = Reply(200, b"x" * 100, trickle=0.5)      # 50 s for the whole answer


async def test_a_receiver_that_trickles_is_cut_at_timeout_s_each_attempt(
        env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    upstream.route("/hook", lambda r: TRICKLE)
    env.write_config(csv_source("items", env.dir / "missing.csv", fields=FIELDS),
                     extra=hooks(f"{upstream.base}/hook", "timeout_s = 1\nmax_attempts = 3"))
    started = time.monotonic()
    done = env.cli("run", "items", ETLSVC_HOOK_SECRET=SECRET, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 1
    # three attempts of 1 s, two short waits, the start and the run: far from 3 × 50 s
    assert took < 20, took
    assert len([r for r in upstream.requests if r.method == "POST"]) == 3
    outcomes = await pool.fetchval("SELECT outcomes FROM etl_notifications")
    assert outcomes == ["failed after 3 attempt(s): no whole answer within timeout_s (1 s)"]


async def test_serve_waits_for_deliveries_at_most_its_grace_and_the_next_process_sends_them(
        env: Env, pool: asyncpg.Pool, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.integration.test_service import KEY, servers

    monkeypatch.setenv("ETLSVC_HOOK_SECRET", SECRET)
    monkeypatch.setenv("ETLSVC_API_KEYS", "test-key")
    replies = {"now": TRICKLE}
    upstream.route("/hook", lambda r: replies["now"])
    (env.dir / "ok.csv").write_text("id,title\nk1,t1\n")
    env.write_config(csv_source("items", env.dir / "missing.csv", fields=FIELDS)
                     + csv_source("ok", env.dir / "ok.csv", fields=FIELDS),
                     extra=hooks(f"{upstream.base}/hook", "timeout_s = 60")
                     + "[server]\nshutdown_grace_s = 2\n")
    with servers(env) as (server,):
        import httpx
        assert httpx.post(f"{server.base}/etl/run", json={"sources": ["items"]},
                          headers=KEY).status_code == 202
        deadline = time.monotonic() + 30
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstream.requests, "no delivery began"
        started = time.monotonic()
        assert server.stop() == 0
        took = time.monotonic() - started
    assert took < 2 + 3, (took, server.output[-2000:])         # the grace, not 60 s
    assert "deliveries cut short at shutdown" in server.output
    row = await pool.fetchrow("SELECT id, outcomes, due_at <= now() AS due "
                              "FROM etl_notifications")
    assert row["outcomes"] is None and row["due"], dict(row)
    # The next process (here a CLI run of another source) sends it, under the same id.
    replies["now"] = Reply(204)
    upstream.requests.clear()
    assert env.cli("run", "ok", ETLSVC_HOOK_SECRET=SECRET).returncode == 0
    posts = [verify(r) for r in upstream.requests]
    assert [(p["id"], p["event"], p["source"]) for p in posts] == \
        [(row["id"], "run_failed", "items")]
    assert await pool.fetchval("SELECT outcomes FROM etl_notifications") == \
        ["delivered after 1 attempt(s)"]
