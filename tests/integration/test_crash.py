"""Crash safety: SIGKILL of a real `etlsvc run` at random moments loses and duplicates nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import asyncpg

from tests.conftest import Env, csv_source

NORMALIZED = (
    "SELECT source_id, title, description, category, amount, url, tags, event_time "
    "FROM normalized_data WHERE source = $1 ORDER BY source_id"
)
RAW = (
    "SELECT file, line, byte_offset, source_key, record FROM raw_csv_data "
    "WHERE source = $1 ORDER BY line"
)
REJECTS = (
    "SELECT stream, position, record, reason FROM etl_rejects WHERE source = $1 "
    "ORDER BY (position->>'line')::bigint"
)


async def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    # 40 batches: room for five kills, each after a commit, before the file ends.
    full, _ = gen_csv(100_000)
    env.write_config(
        csv_source("crash", full, extra="batch_size = 2500")
        + csv_source("ref", full, extra="batch_size = 2500")
    )
    assert env.cli("run", "ref").returncode == 0  # the uninterrupted reference

    seed = int(os.environ.get("ETLSVC_CRASH_SEED", time.time()))
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "etlsvc", "run", "crash", "--config", str(env.dir / "config.toml")]
    offsets = []

    async def committed_offset() -> int:
        state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE source = 'crash'")
        return state["offset"] if state else 0

    for attempt in range(40):
        before = await committed_offset()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url},
        )
        if attempt < 5:  # five kills at random moments, then let it finish
            if attempt == 0:  # at start-up, before or around the first batch
                time.sleep(rng.uniform(0.2, 1.0))
            else:  # after this attempt committed something, a random time into a batch
                while proc.poll() is None and await committed_offset() == before:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            offsets.append(await committed_offset())
            continue
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
        break
    kills = await pool.fetchval(
        "SELECT count(*) FROM etl_runs WHERE source = 'crash' AND error LIKE 'interrupted%'"
    )
    size = full.stat().st_size
    # The kills landed mid-run: progress was committed between them, the file not finished.
    assert kills >= 4, f"seed {seed}: only {kills} kills interrupted a run ({offsets})"
    assert any(0 < o < size for o in offsets), f"seed {seed}: {offsets}"

    for query in (NORMALIZED, RAW, REJECTS):
        crash = [tuple(r) for r in await pool.fetch(query, "crash")]
        ref = [tuple(r) for r in await pool.fetch(query, "ref")]
        assert len(crash) == len(ref), f"seed {seed}: {query}"
        assert crash == ref, f"seed {seed}: {query}"
    state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE source = 'crash'")
    assert state["offset"] == size
    assert await pool.fetchval(
        "SELECT count(*) FROM raw_csv_data WHERE source = 'crash'"
    ) == await pool.fetchval("SELECT rows_valid FROM etl_runs WHERE source = 'ref'")
