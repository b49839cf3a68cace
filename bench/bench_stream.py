"""Stream benchmark: end-to-end messages per second from NATS JetStream into PostgreSQL, and
the consumer's lag under a steady publisher.

usage: python bench/bench_stream.py [--messages N] [--rate R] [--seconds S]
       [--database-url URL] [--nats URL]

1. Backlog: N messages (default 200,000) are published first; then `etlsvc run` of the
   stream source consumes them all (its drain mode) into an empty database. Reported: its
   wall time and messages/s (start of the process to every message committed).
2. Steady: `etlsvc serve` consumes while a publisher sends R messages/s (default 10,000)
   for S seconds (default 20). /health's lag is sampled every 0.25 s; reported: its median
   and maximum, and how long after the last publish the last message was committed.

Results are appended to bench/RESULTS.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import nats

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(HERE))
from bench_csv import fresh_db  # noqa: E402


def message(i: int) -> bytes:
    return json.dumps({"id": f"m{i}", "title": f"message {i}", "amount": i % 1000,
                       "at": "2024-05-01T12:00:00Z", "tags": ["a", "b"]}).encode()


def config(stream: str, nats_url: str) -> str:
    return f"""
[[sources]]
name = "s"
kind = "stream"
servers = ["{nats_url}"]
stream = "{stream}"
batch_size = 5000
[sources.fields]
source_id = "id"
title = "title"
amount = "amount"
tags = "tags"
event_time = "at"
"""


async def publish(nc: nats.NATS, subject: str, first: int, count: int) -> None:
    for i in range(first, first + count):
        await nc.publish(subject, message(i))
        if i % 5000 == 4999:
            await nc.flush()
    await nc.flush()


async def until(condition) -> None:
    """Poll an async ``condition`` every 50 ms until it holds."""
    while not await condition():
        await asyncio.sleep(0.05)


async def stored(js, stream: str, n: int) -> bool:
    return (await js.stream_info(stream)).state.messages >= n


async def loaded(db: str, n: int) -> bool:
    return await count(db) >= n


async def count(db: str) -> int:
    conn = await asyncpg.connect(db)
    try:
        return await conn.fetchval("SELECT count(*) FROM raw_stream_data")
    finally:
        await conn.close()


async def backlog(args: argparse.Namespace, work: Path) -> dict[str, float]:
    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    stream = f"BENCH_{uuid.uuid4().hex[:8].upper()}"
    await js.add_stream(name=stream, subjects=[f"bench.{stream}"])
    try:
        await publish(nc, f"bench.{stream}", 0, args.messages)
        await until(lambda: stored(js, stream, args.messages))
        (work / "config.toml").write_text(config(stream, args.nats))
        db = fresh_db(args.database_url, "etlsvc_bench_stream")
        env = {**os.environ, "ETLSVC_DATABASE_URL": db, "ETLSVC_LOG_LEVEL": "warning"}
        etlsvc = [sys.executable, "-m", "etlsvc"]
        subprocess.run([*etlsvc, "migrate", "--config", str(work / "config.toml")], env=env,
                       check=True, capture_output=True)
        start = time.perf_counter()
        subprocess.run([*etlsvc, "run", "--no-progress", "--config",
                        str(work / "config.toml")], env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        loaded = await count(db)
        assert loaded == args.messages, (loaded, args.messages)
        return {"seconds": seconds, "per_s": args.messages / seconds}
    finally:
        await js.delete_stream(stream)
        await nc.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def steady(args: argparse.Namespace, work: Path) -> dict[str, float]:
    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    stream = f"BENCH_{uuid.uuid4().hex[:8].upper()}"
    subject = f"bench.{stream}"
    await js.add_stream(name=stream, subjects=[subject])
    (work / "config.toml").write_text(config(stream, args.nats))
    db = fresh_db(args.database_url, "etlsvc_bench_stream")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "serve", "--port", str(port), "--config",
         str(work / "config.toml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "ETLSVC_DATABASE_URL": db, "ETLSVC_LOG_LEVEL": "warning"})
    lags: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(100):
                try:
                    await client.get("/health")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)

            async def sample() -> None:
                while True:
                    health = (await client.get("/health")).json()["data"]
                    lags.append(health["sources"]["s"].get("lag") or 0)
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            total = args.rate * args.seconds
            start = time.perf_counter()
            sent = 0
            while sent < total:               # R messages per second, in 100 ms steps
                step = args.rate // 10
                await publish(nc, subject, sent, step)
                sent += step
                await asyncio.sleep(max(0.0, start + sent / args.rate - time.perf_counter()))
            published = time.perf_counter()
            await until(lambda: loaded(db, total))
            drained = time.perf_counter() - published
            sampler.cancel()
        return {"lag_median": statistics.median(lags), "lag_max": max(lags),
                "drained_after_s": drained, "messages": total}
    finally:
        server.terminate()
        server.wait(timeout=60)
        await js.delete_stream(stream)
        await nc.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        b = asyncio.run(backlog(args, Path(tmp)))
        print(f"backlog: {args.messages:,} messages in {b['seconds']:.2f} s = "
              f"{b['per_s']:,.0f} messages/s", flush=True)
        s = asyncio.run(steady(args, Path(tmp)))
        print(f"steady {args.rate:,}/s for {args.seconds} s: lag median {s['lag_median']:,.0f}"
              f", max {s['lag_max']:,.0f} messages; last message committed "
              f"{s['drained_after_s']:.2f} s after the last publish", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    with RESULTS.open("a") as f:
        f.write(f"""
## Stream (NATS JetStream → PostgreSQL), {dt.date.today()}

`python bench/bench_stream.py {' '.join(sys.argv[1:])}` — {os.cpu_count()} cores, {cpu}

| measure | value |
|---|---|
| backlog of {args.messages:,} messages, `etlsvc run` | {b['seconds']:.2f} s, \
**{b['per_s']:,.0f} messages/s** |
| steady {args.rate:,} messages/s for {args.seconds} s: lag median / max | \
{s['lag_median']:,.0f} / {s['lag_max']:,.0f} messages |
| last message committed after the last publish | {s['drained_after_s']:.2f} s |
""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
