"""Decompression bombs: 256 MiB of zeros in a quarter of a megabyte of gzip, as a JSON Lines
file and as a ``.csv.gz``, between ordinary records. Memory stays bounded whatever the
ratio (the process tree's peak RSS, workers included, under 150 MiB: less than the zeros),
the zeros are one oversized record as in a plain file, and ``max_decompressed_bytes`` ends
the run with one clear line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Env, csv_source, log_events

pytestmark = pytest.mark.slow

ZEROS = 1 << 28
GOOD = 200                 # records on each side of the zeros (one reject is under 5 %)


def bomb(path: Path, before: bytes, after: bytes) -> Path:
    """``before``, ZEROS NUL bytes and a line break, then ``after``, gzip-compressed
    (level 9: about a thousandth)."""
    block = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(before)
        for _ in range(ZEROS // len(block)):
            f.write(block)
        f.write(b"\n" + after)
    return path


def jsonl(first: int, count: int) -> bytes:
    return b"".join(json.dumps({"id": f"k{i}", "title": f"t{i}"}).encode() + b"\n"
                    for i in range(first, first + count))


def csv_rows(first: int, count: int) -> bytes:
    return b"".join(f"k{i},t{i}\n".encode() for i in range(first, first + count))


JSONL_SOURCE = """
[[sources]]
name = "bomb"
kind = "jsonl"
path = "bomb.jsonl.gz"
{extra}
[sources.fields]
source_id = "id"
title = "title"
"""


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    here = tmp_path_factory.mktemp("bombs")
    return {"jsonl": bomb(here / "bomb.jsonl.gz", jsonl(0, GOOD), jsonl(GOOD, GOOD)),
            "csv": bomb(here / "bomb.csv.gz", b"id,title\n" + csv_rows(0, GOOD),
                        csv_rows(GOOD, GOOD))}


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
async def test_a_bomb_costs_bounded_memory_and_its_zeros_are_one_reject(
        env: Env, pool: asyncpg.Pool, bombs: dict[str, Path], kind: str) -> None:
    assert bombs[kind].stat().st_size < 2 << 20
    name = f"bomb.{'jsonl' if kind == 'jsonl' else 'csv'}.gz"
    (env.dir / name).symlink_to(bombs[kind])
    source = (JSONL_SOURCE.format(extra="") if kind == "jsonl" else
              csv_source("bomb", name, fields='source_id = "id"\ntitle = "title"\n'))
    env.write_config(source)
    ran, peak_mib = env.cli_peak("run", "--no-progress")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert peak_mib <= 150, f"peak RSS {peak_mib:.0f} MiB"
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == 2 * GOOD
    rejects = await pool.fetch("SELECT position, reason, record FROM etl_rejects")
    assert len(rejects) == 1, rejects
    [reject] = rejects
    # As for a plain file (tests/unit/test_file_stream.py compares the two): the JSON
    # line is too long; the CSV record, a field of NULs, is one malformed record, whose
    # prefix, length (line break included) and SHA-256 are kept.
    first_line = GOOD + (2 if kind == "csv" else 1)
    assert reject["position"]["line"] == first_line
    if kind == "jsonl":
        assert "longer than max_record_bytes" in reject["reason"]
        assert reject["record"]["bytes"] == ZEROS
    else:
        assert "expected 2 fields (as in the header), found 1" in reject["reason"]
        assert reject["record"]["bytes"] == ZEROS + 1


async def test_max_decompressed_bytes_ends_the_run_with_one_clear_line(
        env: Env, pool: asyncpg.Pool, bombs: dict[str, Path]) -> None:
    (env.dir / "bomb.jsonl.gz").symlink_to(bombs["jsonl"])
    env.write_config(JSONL_SOURCE.format(extra=f"max_decompressed_bytes = {ZEROS // 2}"))
    ran, peak_mib = env.cli_peak("run", "--no-progress")
    assert ran.returncode == 1
    assert peak_mib <= 150, f"peak RSS {peak_mib:.0f} MiB"
    [failed] = [e for e in log_events(ran.stdout) if e.get("event") == "run finished"]
    assert failed["status"] == "failed"
    assert f"decompresses to more than {ZEROS // 2:,} bytes (max_decompressed_bytes)" in \
        failed["error"], failed
    run = await pool.fetchrow("SELECT status, error FROM etl_runs")
    assert run["status"] == "failed" and "max_decompressed_bytes" in run["error"]
    assert "\n" not in run["error"]
