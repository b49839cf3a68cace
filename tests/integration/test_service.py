"""`etlsvc serve`: run control, the read API, errors and shutdown, over real HTTP and DB."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from etlsvc import db
from etlsvc.api.app import create_app
from etlsvc.config import Config, load_config
from etlsvc.runtime import workers
from etlsvc.runtime.service import Service
from tests.conftest import RECORD_WRITES, Env, csv_source, descendants

KEY = {"Authorization": "Bearer test-key"}


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETLSVC_API_KEYS", "other-key, test-key")


async def fill(pool: asyncpg.Pool, n: int, source: str = "bulk") -> None:
    await pool.execute(
        "INSERT INTO normalized_data (kind, source, source_id, title, category, raw_table, "
        "raw_id, run_id) SELECT 'csv', $1, 'k' || g, 't' || g, 'c' || (g % 7), "
        "'raw_csv_data', g, 0 FROM generate_series(1, $2) g",
        source,
        n,
    )
    await pool.execute(RECORD_WRITES)


async def test_paging_returns_every_row_once_even_with_inserts_while_paging(
    env: Env, pool: asyncpg.Pool
) -> None:
    await fill(pool, 10_000)
    cfg = env.config("")
    async with AsyncTestClient(app=create_app(cfg)) as client:
        seen: list[int] = []
        cursor = None
        pages = 0
        while True:
            params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            r = await client.get("/data", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            seen += [row["id"] for row in body["data"]]
            pages += 1
            if pages == 3:  # rows arrive while a client pages
                await fill(pool, 500, source="late")
            if not body["metadata"]["pagination"]["has_more"]:
                break
            cursor = body["metadata"]["pagination"]["next_cursor"]
        assert len(seen) == len(set(seen))
        original = {
            r["id"]
            for r in await pool.fetch("SELECT id FROM normalized_data WHERE source = 'bulk'")
        }
        assert original <= set(seen) and len(original) == 10_000
        # filters, a tampered cursor, limits, ETag
        r = await client.get("/data", params={"category": "c3", "limit": 5})
        assert {row["category"] for row in r.json()["data"]} == {"c3"}
        nxt = r.json()["metadata"]["pagination"]["next_cursor"]
        tampered = nxt[:-2] + ("A" if nxt[-2] != "A" else "B") + nxt[-1]
        bad = await client.get("/data", params={"category": "c3", "cursor": tampered})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_cursor"
        other = await client.get("/data", params={"category": "c4", "cursor": nxt})
        assert other.status_code == 400
        for limit in ("0", "1001", "x"):
            r = await client.get("/data", params={"limit": limit})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_parameter"
        # The data version is read again in the background every 0.25 s: the late rows may
        # change the ETag once more after they were inserted, never after that.
        first = await client.get("/data", params={"limit": 10})
        for _ in range(3):
            again = await client.get(
                "/data", params={"limit": 10}, headers={"If-None-Match": first.headers["etag"]}
            )
            if again.status_code == 304:
                break
            first = again
            await asyncio.sleep(0.3)
        assert again.status_code == 304 and again.content == b""
        other = await client.get(
            "/data", params={"limit": 11}, headers={"If-None-Match": first.headers["etag"]}
        )
        assert other.status_code == 200


async def test_run_control_auth_lineage_and_errors(env: Env, pool: asyncpg.Pool, gen_csv) -> None:
    full, _ = gen_csv(5_000)
    cfg = env.config(csv_source("products", full, extra="batch_size = 1000"))
    async with AsyncTestClient(app=create_app(cfg)) as client:
        assert (await client.post("/etl/run")).status_code == 401
        wrong = await client.post("/etl/run", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
        assert await pool.fetchval("SELECT count(*) FROM etl_runs") == 0
        unknown = await client.post("/etl/run", json={"sources": ["nope"]}, headers=KEY)
        assert unknown.status_code == 404
        big = await client.post(
            "/etl/run",
            content=b"x" * (2 << 20),
            headers={**KEY, "Content-Type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"

        # The run is held before its first batch (its checkpoints' table is locked), so the
        # second request always finds it running.
        async with pool.acquire() as holder, holder.transaction():
            await holder.execute("LOCK TABLE etl_checkpoints IN ACCESS EXCLUSIVE MODE")
            r = await client.post("/etl/run", json={"sources": ["products"]},
                                  headers={**KEY, "X-Request-ID": "req-42"})
            assert r.status_code == 202, r.text
            assert r.headers["x-request-id"] == "req-42"
            assert r.json()["metadata"]["request_id"] == "req-42"
            run_id = r.json()["data"]["runs"][0]["run_id"]
            busy = await client.post("/etl/run", json={"sources": ["products"]}, headers=KEY)
            assert busy.status_code == 409, busy.text
            assert busy.json()["error"]["running_run_id"] == run_id
        for _ in range(200):
            run = (await client.get(f"/etl/runs/{run_id}")).json()["data"]
            if run["status"] != "running":
                break
            await asyncio.sleep(0.05)
        assert run["status"] == "succeeded" and run["percent"] == 100.0
        listed = (await client.get("/etl/runs", params={"source": "products"})).json()
        assert listed["data"][0]["id"] >= run_id

        rejects = (await client.get("/etl/rejects", params={"run_id": run_id, "limit": 10})).json()
        assert len(rejects["data"]) == 10 and rejects["metadata"]["pagination"]["has_more"]
        assert all(r["run_id"] == run_id and r["reason"] for r in rejects["data"])
        more = await client.get(
            "/etl/rejects",
            params={
                "run_id": run_id,
                "limit": 10,
                "cursor": rejects["metadata"]["pagination"]["next_cursor"],
            },
        )
        assert more.json()["data"][0]["id"] > rejects["data"][-1]["id"]

        page = (await client.get("/data", params={"limit": 1})).json()["data"][0]
        one = (await client.get(f"/data/{page['id']}")).json()["data"]
        assert one["lineage"]["raw"]["record"]["id"] == one["source_id"]
        assert one["lineage"]["run"]["id"] == run_id
        missing = await client.get("/data/999999999")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/schema/openapi.json")).status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A real `etlsvc serve` process on a free port."""

    proc: subprocess.Popen
    port: int
    output: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_up(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base}/health", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"no server on {self.port}")

    def stop(self) -> int:
        """SIGTERM (graceful stop); the exit code; the output is kept in ``output``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.output = self.proc.communicate(timeout=60)[0].decode()
        return self.proc.returncode


@contextlib.contextmanager
def servers(env: Env, count: int = 1,
            environs: Sequence[dict[str, str]] = ()) -> Iterator[list[Server]]:
    """``count`` servers on ``env``'s config, up and answering; stopped at the end. Server
    ``i`` gets ``environs[i]`` in its environment, if given."""
    started = []
    for i in range(count):
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "etlsvc",
                "serve",
                "--port",
                str(port),
                "--config",
                str(env.dir / "config.toml"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url,
                 **(environs[i] if i < len(environs) else {})},
        )
        started.append(Server(proc, port))
    try:
        for server in started:
            server.wait_up()
        yield started
    finally:
        for server in started:
            server.stop()


async def test_two_servers_one_run_the_other_409(env: Env, pool: asyncpg.Pool, gen_csv) -> None:
    # Seconds of loading: the two requests arrive milliseconds apart, well within the run.
    full, _ = gen_csv(20_000)
    env.write_config(csv_source("products", full, extra="batch_size = 5000"))
    with servers(env, 2) as pair:
        answers = await asyncio.gather(
            *(
                asyncio.to_thread(
                    httpx.post, f"{s.base}/etl/run", json={"sources": ["products"]}, headers=KEY
                )
                for s in pair
            )
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [202, 409], [a.text for a in answers]
        ok = next(a for a in answers if a.status_code == 202).json()["data"]["runs"][0]
        conflict = next(a for a in answers if a.status_code == 409).json()["error"]
        assert conflict["running_run_id"] == ok["run_id"]
        assert await pool.fetchval("SELECT count(*) FROM etl_runs") == 1


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_sigterm_during_a_run_exits_in_time_with_whole_batches(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    full, _ = gen_csv(200_000)
    # A grace far shorter than the load: the stop cancels the run after it.
    env.write_config(csv_source("products", full, extra="batch_size = 5000"),
                     extra="[server]\nshutdown_grace_s = 1")
    with servers(env) as (server,):
        assert httpx.post(f"{server.base}/etl/run", headers=KEY).status_code == 202
        while not await pool.fetchval("SELECT count(*) FROM etl_checkpoints"):
            time.sleep(0.05)
        # The parsing worker yields the CPU to the API: it runs 10 nice levels lower.
        workers = [p for p in descendants(server.proc.pid)
                   if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert [niceness(p) for p in workers] == [niceness(server.proc.pid) + 10]
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 10
    state = await pool.fetchval("SELECT state FROM etl_checkpoints")
    raw = await pool.fetchval("SELECT count(*) FROM raw_csv_data")
    rejects = await pool.fetchval("SELECT count(*) FROM etl_rejects")
    run = await pool.fetchrow("SELECT * FROM etl_runs")
    assert run["status"] == "interrupted" and 0 < run["rows_read"] < 200_000, dict(run)
    # The checkpoint, the raw rows and the counters describe the same whole batches.
    assert raw + rejects == run["rows_read"]
    assert state["line"] >= run["rows_read"]
    # The next run resumes from the checkpoint and completes the file exactly.
    env.cli("run", "products")
    assert (
        await pool.fetchval("SELECT count(*) FROM raw_csv_data")
        + await pool.fetchval("SELECT count(*) FROM etl_rejects")
        == 200_000
    )


async def test_rate_limit_answers_429_in_the_envelope(env: Env, pool: asyncpg.Pool) -> None:
    cfg = env.config("", extra="[server]\nrate_limit_per_minute = 5")
    async with AsyncTestClient(app=create_app(cfg)) as client:
        codes = [(await client.get("/data")).status_code for _ in range(6)]
        if codes[-1] == 200:        # a new minute began meanwhile: count again
            codes = [(await client.get("/data")).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        limited = await client.get("/data", headers={"X-Request-ID": "limited-1"})
        assert limited.json()["error"]["code"] == "too_many_requests"
        assert limited.json()["metadata"]["request_id"] == "limited-1"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert (await client.get("/health")).status_code == 200  # not limited


async def test_stats_and_metrics(env: Env, pool: asyncpg.Pool, gen_csv) -> None:
    full, _ = gen_csv(2_000)
    cfg = env.config(csv_source("products", full))
    from tests.conftest import run_source

    run = await run_source(cfg, "products")
    async with AsyncTestClient(app=create_app(cfg)) as client:
        for _ in range(5):
            await client.get("/data", params={"limit": 3})
        stats = (await client.get("/stats")).json()["data"]
        products = stats["sources"]["products"]
        assert products["rows"] == run["rows_inserted"]
        assert (products["runs"], products["succeeded"], products["success_rate"]) == (1, 1, 1.0)
        assert products["error_rate"] == round(run["rows_rejected"] / run["rows_read"], 4)
        assert products["last_rows_per_s"] > 0
        assert stats["pools"]["read"]["max"] >= 1
        assert stats["api_latency"]["requests"] >= 5 and stats["api_latency"]["p99_ms"] > 0
        text = (await client.get("/metrics")).text
        assert 'etlsvc_runs_total{source="products",status="succeeded"}' in text
        assert "etlsvc_http_request_duration_seconds_bucket" in text
        assert 'etlsvc_db_pool_connections{pool="read",state="idle"}' in text


async def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    """Property-based requests from our own OpenAPI; the event streams never end, so they
    are left out."""
    full, _ = gen_csv(2_000)
    # Every operation is tried ~60 times within a minute: past the default limit of 1,200
    # requests a minute, the last ones would only meet 429 (the limiter has tests of its own).
    env.write_config(csv_source("products", full),
                     extra="[server]\nrate_limit_per_minute = 100000")
    with servers(env) as (server,):
        assert httpx.post(f"{server.base}/etl/run", headers=KEY).status_code == 202
        result = subprocess.run(
            [
                os.path.join(os.path.dirname(sys.executable), "schemathesis"),
                "run",
                f"{server.base}/schema/openapi.json",
                "--max-examples",
                "20",
                "--seed",
                "20261125",
                "-H",
                "Authorization: Bearer test-key",
                "--phases",
                "examples,coverage,fuzzing",
                "--exclude-path",
                "/logs/stream",
                "--exclude-path",
                "/data/changes/stream",
                "--exclude-path",
                "/etl/runs/{run_id}/log",
                "--checks",
                "not_a_server_error,status_code_conformance,"
                "content_type_conformance,response_schema_conformance",
                # Every warning but two: the body of POST /etl/rejects/retry|ignore names a
                # configured source, which no schema can know, so generated ones get 404.
                "--warnings",
                "missing_auth,base_url_mismatch,missing_deserializer,unused_openapi_auth,"
                "unsupported_regex,method_not_allowed,unresolvable_reference,low_valid_rate,"
                "rate_limited",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "No issues found" in result.stdout, result.stdout[-6000:]


async def test_scheduled_runs_happen_once_per_tick_across_two_replicas(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    full, _ = gen_csv(20_000)
    env.write_config(csv_source("products", full, extra='schedule = "2s"\nbatch_size = 2000'))
    with servers(env, 2) as pair:
        # At least two ticks' runs (a loaded machine takes longer than a tick for one).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and await pool.fetchval(
                "SELECT count(*) FROM etl_runs WHERE status = 'succeeded'") < 2:
            await asyncio.sleep(0.5)
        stats = httpx.get(f"{pair[0].base}/stats").json()["data"]
        # The loop's worst stall is measured (tests/unit/test_loop_monitor.py: a real one).
        assert isinstance(stats["event_loop_worst_lag_ms_1min"], float)
    logs = [server.output for server in pair]
    runs = await pool.fetch("SELECT * FROM etl_runs ORDER BY started_at")
    assert len(runs) >= 2 and all(r["trigger"] == "schedule" for r in runs)
    # Every run but one the replicas' stop interrupted succeeded.
    assert all(r["status"] == "succeeded" for r in runs[:-1]), (
        [(r["id"], r["status"], r["error"]) for r in runs], [out[-2000:] for out in logs])
    assert runs[-1]["status"] in ("succeeded", "interrupted"), runs[-1]["error"]
    # never two runs of the source at once, though both replicas tick
    for a, b in itertools.pairwise(runs):
        assert a["finished_at"] is not None and a["finished_at"] <= b["started_at"]
    assert runs[0]["rows_inserted"] == runs[0]["rows_valid"] > 19_000
    # every process logs as JSON on stdout, ours and the libraries' alike
    for out in logs:
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines and all(line.startswith("{") for line in lines), lines[:3]
    assert any('"scheduler started"' in out for out in logs)


def hourly_csv(env: Env, tmp_path: Path, rows: int) -> Config:
    """The config of one source ``p``, a CSV file of ``rows`` rows scheduled every hour."""
    path = tmp_path / "p.csv"
    path.write_text("id,title\n" + "".join(f"K{i},t{i}\n" for i in range(rows)))
    return load_config(env.write_config(csv_source(
        "p", path, fields='source_id = "id"\ntitle = "title"', extra='schedule = "1h"')))


async def test_a_tick_cancelled_while_claiming_still_sees_its_run_through(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # The scheduler's shutdown cancels its jobs under way (APScheduler 3's asyncio executor).
    # A tick cancelled in the middle of its claim must not cancel the claim: one cancelled
    # just after writing its run row left that row 'running' and the run never executed.
    cfg = hourly_csv(env, tmp_path, 100)
    async with db.open_database(cfg) as database:
        service = Service(cfg, database, workers.from_config(cfg.pipeline))
        async with pool.acquire() as blocker, blocker.transaction():
            # The claim's INSERT of the run row waits for this lock.
            await blocker.execute("LOCK TABLE etl_runs IN EXCLUSIVE MODE")
            tick = asyncio.create_task(service.scheduled_run("p"))
            for _ in range(200):         # 10 s at most, not a hang if the claim never waits
                if await blocker.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock'"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the claim never waited for the lock on etl_runs")
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)
        await service.stop(grace=30)
    runs = await pool.fetch("SELECT status, rows_inserted FROM etl_runs")
    assert [tuple(r) for r in runs] == [("succeeded", 100)]


async def test_a_tick_after_a_quick_run_of_that_tick_does_not_run_it_again(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # Replicas tick at the same instants, but not at the same microsecond: one whose tick
    # comes after another replica's run of that tick has let go of the lock must skip it.
    cfg = hourly_csv(env, tmp_path, 10)
    async with db.open_database(cfg) as database:
        first, late = (Service(cfg, database, workers.from_config(cfg.pipeline))
                       for _ in range(2))
        await first.scheduled_run("p")
        with capture_logs() as logs:
            await late.scheduled_run("p")    # the same tick, just later: skipped
        [manual] = await late.start_runs([cfg.source("p")])   # asked for: runs
        await late.stop(grace=30)
        await first.stop(grace=30)
    runs = await pool.fetch("SELECT id, trigger, status FROM etl_runs ORDER BY id")
    assert [tuple(r) for r in runs] == [(runs[0]["id"], "schedule", "succeeded"),
                                        (manual, "manual", "succeeded")]
    assert {"event": "scheduled run skipped: another replica ran it at this tick",
            "source": "p", "run_id": runs[0]["id"], "log_level": "info"} in logs

async def test_data_filters_and_health_degrades_when_a_source_is_stale(
    env: Env, pool: asyncpg.Pool
) -> None:
    await pool.execute(
        "INSERT INTO normalized_data (kind, source, source_id, category, event_time, raw_table,"
        " raw_id, run_id, updated_at) SELECT CASE WHEN g % 2 = 0 THEN 'csv' ELSE 'api' END, "
        "'s' || (g % 3), 'k' || g, 'c', '2024-01-01'::timestamptz + g * interval '1 day', "
        "'raw_csv_data', g, 0, '2024-06-01'::timestamptz + g * interval '1 hour' "
        "FROM generate_series(1, 100) g"
    )
    await pool.execute(RECORD_WRITES)
    cfg = env.config(
        csv_source("fresh", "x.csv", extra='schedule = "1h"')
        + csv_source("old", "y.csv", extra='schedule = "1m"')
    )
    async with AsyncTestClient(app=create_app(cfg)) as client:

        async def ids(**params: str) -> list[int]:
            r = await client.get("/data", params={"limit": 1000, **params})
            assert r.status_code == 200, r.text
            return [row["id"] for row in r.json()["data"]]

        assert len(await ids(kind="api")) == 50
        assert len(await ids(source="s1")) == 34  # g % 3 == 1 for g in 1..100
        window = await ids(event_from="2024-01-11T00:00:00Z", event_to="2024-01-21T00:00:00Z")
        assert window == list(range(10, 20))
        assert await ids(updated_since="2024-06-05T00:00:00Z") == list(range(96, 101))
        assert (await client.get("/data", params={"kind": "ftp"})).status_code == 400

        assert (await client.get("/health")).status_code == 200  # nothing run yet
        await pool.execute(
            "INSERT INTO etl_runs (source, kind, trigger, status, started_at, finished_at) "
            "VALUES ('old', 'csv', 'schedule', 'succeeded', now() - interval '1 hour', "
            "now() - interval '1 hour'), ('fresh', 'csv', 'schedule', 'succeeded', now(), "
            "now())"
        )
        health = await client.get("/health")
        assert health.status_code == 503
        body = health.json()["data"]
        assert body["status"] == "degraded"
        assert body["sources"]["old"]["stale"] and not body["sources"]["fresh"]["stale"]


@pytest.mark.parametrize("fail_on_failing", [False, True])
async def test_health_reports_failing_sources_and_fails_only_if_asked(
    env: Env, pool: asyncpg.Pool, gen_csv, fail_on_failing: bool
) -> None:
    full, _ = gen_csv(2_000)
    cfg = env.config(
        csv_source("good", full) + csv_source("broken", env.dir / "missing.csv"),
        extra=f"[server]\nhealth_fails_on_failing_sources = {str(fail_on_failing).lower()}")
    async with AsyncTestClient(app=create_app(cfg)) as client:
        r = await client.post("/etl/run", headers=KEY)
        ids = [x["run_id"] for x in r.json()["data"]["runs"]]
        for _ in range(200):
            runs = [(await client.get(f"/etl/runs/{i}")).json()["data"] for i in ids]
            if all(x["status"] != "running" for x in runs):
                break
            await asyncio.sleep(0.05)
        health = await client.get("/health")
    body = health.json()["data"]
    assert body["failing_sources"] == ["broken"]
    assert body["sources"]["broken"]["failing"] and "missing.csv" in body["sources"][
        "broken"]["error"]
    assert not body["sources"]["good"]["failing"]
    assert health.status_code == (503 if fail_on_failing else 200)


async def test_every_read_endpoint_uses_the_read_pool(env: Env, pool: asyncpg.Pool) -> None:
    import dataclasses

    from etlsvc.api.app import create_litestar

    class EtlPoolUsed(Exception):
        pass

    class Sizes:
        """The ETL pool as a read endpoint may see it: its sizes only (for /stats)."""

        def __init__(self, real: asyncpg.Pool) -> None:
            self.get_size, self.get_idle_size = real.get_size, real.get_idle_size
            self.get_max_size = real.get_max_size

        def __getattr__(self, name: str) -> object:
            raise EtlPoolUsed(name)

    await fill(pool, 10)
    app = create_litestar(env.config(""))
    async with AsyncTestClient(app=app) as client:
        service = app.state.service
        real = service.database
        service.database = dataclasses.replace(real, pool=Sizes(real.pool))
        try:
            first = (await client.get("/data", params={"limit": 1})).json()["data"][0]["id"]
            for path in ("/data", f"/data/{first}", "/data/changes", "/etl/runs",
                         "/etl/rejects", "/health", "/stats", "/etl/runs?status=running"):
                r = await client.get(path)
                assert r.status_code == 200, (path, r.text)
        finally:
            service.database = real


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_idle_and_slowloris_connections_are_closed_at_the_header_timeout(
    env: Env, pool: asyncpg.Pool
) -> None:
    env.write_config("", extra="[server]\nrequest_header_timeout_s = 1")
    with servers(env) as (server,):
        address = ("127.0.0.1", server.port)
        idle = [socket.create_connection(address) for _ in range(20)]
        slow = socket.create_connection(address)
        kept = socket.create_connection(address)      # one whole request, then nothing
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 20:
            try:
                slow.send(bytes([byte]))               # a header byte every 0.1 s
            except OSError:
                break
            time.sleep(0.1)
        try:
            assert all(closed_by_server(s, 3) for s in idle)
            assert closed_by_server(slow, 3)
            assert time.monotonic() - started < 1 + 5
            answer = kept.recv(65536)
            assert answer.startswith(b"HTTP/1.1 ") and closed_by_server(kept, 8)
        finally:
            for s in [*idle, slow, kept]:
                s.close()
        # The server is fine and answers whole requests.
        assert httpx.get(f"{server.base}/data", timeout=5).status_code == 200
