"""Change data capture benchmark (kind pg_cdc): changes per second end to end for single-row
updates, against `pg_recvlogical` writing the same changes to a file; and the lag under a
steady rate of changes.

usage: python bench/bench_pg_cdc.py [--updates N] [--rounds R] [--rate C] [--seconds S]
       [--database-url URL]

A PostgreSQL 18 cluster of the benchmark's own (embedded binaries, wal_level = logical,
synchronous_commit off) is the source: a table of 100,000 rows that etlsvc snapshots first.

1. Backlog, R rounds (default 2): N single-row updates (default 1,000,000), each its own
   transaction, are committed while nothing reads; then, in alternating order, the floor —
   `pg_recvlogical --start --endpos` of a pgoutput slot of the same publication, writing
   the decoded stream to a file — and `etlsvc run` of the source (it reads until caught up:
   every change committed to normalized_data, the checkpoint with it, the slot advanced) are
   timed from process start to exit. Reported per round: both rates and their ratio.
2. Steady: `etlsvc serve` streams while writers commit C single-row updates per second
   (default 5,000) for S seconds (default 20). /health's slot lag (bytes and seconds) is
   sampled every 0.25 s; reported: median and maximum, and how long after the last update
   it was in normalized_data.

Results are appended to bench/RESULTS.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_csv import fresh_db  # noqa: E402
from bench_stream import free_port  # noqa: E402
from etlsvc.embedded import EmbeddedPostgres, bin_dir  # noqa: E402

ROWS = 100_000
CONFIG = """
[[sources]]
name = "s"
kind = "pg_cdc"
url_env = "BENCH_SOURCE_URL"
tables = ["items"]
poll_interval_s = 0.1
[sources.fields]
source_id = "id"
title = "name"
amount = "amount"
"""
#: N single-row updates, each committed on its own, without a client round trip each.
UPDATES = """
CREATE OR REPLACE PROCEDURE bench_updates(n int, first int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN first .. first + n - 1 LOOP
    UPDATE items SET amount = amount + 1, name = 'update ' || i WHERE id = 1 + i % 100000;
    COMMIT;
  END LOOP;
END $$;
"""


def run(*cmd: str, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


async def backlog(args: argparse.Namespace, source_url: str, port: int, work: Path,
                  env: dict[str, str]) -> list[dict[str, float]]:
    src = await asyncpg.connect(source_url)
    etlsvc = [sys.executable, "-m", "etlsvc"]
    config = ["--config", str(work / "config.toml")]
    recvlogical = str(bin_dir(18) / "pg_recvlogical")
    conn = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "bench"]
    subprocess.run([*etlsvc, "run", "--no-progress", *config], env=env, check=True,
                   capture_output=True)       # the slot, the publication, the snapshot
    subprocess.run([recvlogical, *conn, "--slot", "floor", "--create-slot", "--plugin",
                    "pgoutput"], check=True, capture_output=True)
    rounds = []
    try:
        for r in range(args.rounds):
            made = time.perf_counter()
            await src.execute("CALL bench_updates($1, $2)", args.updates, r * args.updates)
            made = time.perf_counter() - made
            upto = await src.fetchval("SELECT pg_current_wal_lsn()::text")
            floor_cmd = [recvlogical, *conn, "--slot", "floor", "--start", "--endpos", upto,
                         "--no-loop", "-o", "proto_version=1",
                         "-o", "publication_names=etlsvc_s", "-f", str(work / "floor.out")]
            timed: dict[str, float] = {}
            order = ("floor", "etlsvc") if r % 2 == 0 else ("etlsvc", "floor")
            for which in order:
                if which == "floor":
                    timed["floor"] = run(*floor_cmd)
                else:
                    timed["etlsvc"] = run(*etlsvc, "run", "--no-progress", *config, env=env)
            db = await asyncpg.connect(env["ETLSVC_DATABASE_URL"])
            try:
                last = await db.fetchval("SELECT title FROM normalized_data WHERE source_id = $1",
                                         str(1 + (r * args.updates + args.updates - 1) % ROWS))
            finally:
                await db.close()
            assert last == f"update {r * args.updates + args.updates - 1}", last
            result = {"made_s": made, "floor_s": timed["floor"], "etlsvc_s": timed["etlsvc"],
                      "floor_per_s": args.updates / timed["floor"],
                      "etlsvc_per_s": args.updates / timed["etlsvc"],
                      "bytes": (work / "floor.out").stat().st_size}
            result["ratio"] = result["etlsvc_per_s"] / result["floor_per_s"]
            print(f"round {r + 1} ({' then '.join(order)}): {args.updates:,} updates made in "
                  f"{made:.1f} s; floor {result['floor_per_s']:,.0f}/s, etlsvc "
                  f"{result['etlsvc_per_s']:,.0f}/s, ratio {result['ratio']:.2f}", flush=True)
            (work / "floor.out").unlink()
            rounds.append(result)
    finally:
        await src.execute("SELECT pg_drop_replication_slot('floor')")
        await src.close()
    return rounds


async def steady(args: argparse.Namespace, source_url: str, work: Path,
                 env: dict[str, str]) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "serve", "--port", str(port), "--config",
         str(work / "config.toml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env)
    lags: list[tuple[int, float]] = []
    key = {"Authorization": "Bearer bench"}
    writers = 4
    conns = [await asyncpg.connect(source_url) for _ in range(writers)]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=key) as client:
            for _ in range(200):
                try:
                    slot = (await client.get("/health")).json()["data"]["sources"]["s"]["slot"]
                    if slot:
                        break
                except (httpx.TransportError, KeyError):
                    pass
                await asyncio.sleep(0.1)

            async def sample() -> None:
                while True:
                    health = (await client.get("/health")).json()["data"]
                    slot = health["sources"]["s"]["slot"] or {}
                    lags.append((slot.get("lag_bytes") or 0, slot.get("lag_seconds") or 0.0))
                    await asyncio.sleep(0.25)

            async def write(conn: asyncpg.Connection, w: int, total: int) -> None:
                rate = args.rate / writers
                start = time.perf_counter()
                for n in range(total):
                    i = 10_000_000 + n * writers + w
                    await conn.execute("UPDATE items SET amount = amount + 1, name = $2 "
                                       "WHERE id = $1", 1 + i % ROWS, f"steady {i}")
                    if n % 50 == 49:
                        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))

            sampler = asyncio.create_task(sample())
            total = args.rate * args.seconds // writers
            started = time.perf_counter()
            await asyncio.gather(*(write(c, w, total) for w, c in enumerate(conns)))
            wrote = time.perf_counter()
            last = 10_000_000 + (total - 1) * writers + writers - 1
            db = await asyncpg.connect(env["ETLSVC_DATABASE_URL"])
            try:
                while await db.fetchval("SELECT title FROM normalized_data WHERE source_id = $1",
                                        str(1 + last % ROWS)) != f"steady {last}":
                    await asyncio.sleep(0.02)
            finally:
                await db.close()
            drained = time.perf_counter() - wrote
            sampler.cancel()
        return {"rate": total * writers / (wrote - started),
                "lag_bytes_median": statistics.median(b for b, _ in lags),
                "lag_bytes_max": max(b for b, _ in lags),
                "lag_s_median": statistics.median(s for _, s in lags),
                "lag_s_max": max(s for _, s in lags), "drained_after_s": drained}
    finally:
        for c in conns:
            await c.close()
        server.terminate()
        server.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        source = EmbeddedPostgres(work / "source", port=port, listen="127.0.0.1", settings={
            "wal_level": "logical", "synchronous_commit": "off", "max_wal_size": "4GB",
            "shared_buffers": "256MB"})
        admin = source.start()
        try:
            source_url = f"postgresql://postgres@127.0.0.1:{port}/bench"

            async def prepare() -> None:
                conn = await asyncpg.connect(admin)
                await conn.execute("CREATE DATABASE bench")
                await conn.close()
                conn = await asyncpg.connect(source_url)
                await conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, name text, "
                                   "amount bigint)")
                await conn.execute("INSERT INTO items SELECT g, 'item ' || g, g "
                                   "FROM generate_series(1, $1) g", ROWS)
                await conn.execute(UPDATES)
                await conn.close()

            asyncio.run(prepare())
            (work / "config.toml").write_text(CONFIG)
            env = {**os.environ, "ETLSVC_LOG_LEVEL": "warning", "ETLSVC_API_KEYS": "bench",
                   "BENCH_SOURCE_URL": source_url,
                   "ETLSVC_DATABASE_URL": fresh_db(args.database_url, "etlsvc_bench_cdc")}
            rounds = asyncio.run(backlog(args, source_url, port, work, env))
            env["ETLSVC_DATABASE_URL"] = fresh_db(args.database_url, "etlsvc_bench_cdc")
            s = asyncio.run(steady(args, source_url, work, env))
            print(f"steady {s['rate']:,.0f} updates/s for {args.seconds} s: slot lag median "
                  f"{s['lag_bytes_median']:,.0f} B / {s['lag_s_median']:.2f} s, max "
                  f"{s['lag_bytes_max']:,.0f} B / {s['lag_s_max']:.2f} s; the last update "
                  f"loaded {s['drained_after_s']:.2f} s after it was committed", flush=True)
        finally:
            source.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    rows = "\n".join(
        f"| {i + 1} | {r['floor_s']:.1f} s, {r['floor_per_s']:,.0f}/s | {r['etlsvc_s']:.1f} s, "
        f"**{r['etlsvc_per_s']:,.0f}/s** | **{r['ratio']:.2f}** |" for i, r in enumerate(rounds))
    with RESULTS.open("a") as f:
        f.write(f"""
## Change data capture (pg_cdc), {dt.date.today()}

`python bench/bench_pg_cdc.py {' '.join(sys.argv[1:])}` — {os.cpu_count()} cores, {cpu};
source: PostgreSQL 18 (embedded binaries, synchronous_commit off) on the same machine.

{args.updates:,} single-row updates (each its own transaction) per round; the floor is
`pg_recvlogical` of a pgoutput slot writing them to a file; etlsvc is `etlsvc run` to
caught up (loaded, checkpointed, slot advanced). Process start to exit.

| round | floor (pg_recvlogical) | etlsvc | etlsvc / floor |
|---|---|---|---|
{rows}

Steady {s['rate']:,.0f} updates/s for {args.seconds} s under `etlsvc serve`: slot lag median
{s['lag_bytes_median']:,.0f} bytes / {s['lag_s_median']:.2f} s, max {s['lag_bytes_max']:,.0f}
bytes / {s['lag_s_max']:.2f} s; the last update was in normalized_data
{s['drained_after_s']:.2f} s after its commit.
""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
