"""Malformed and oversized CSV records cost only themselves, and every line is accounted for.

A stray quote used to swallow every line up to the next quote (rows vanished and the run
succeeded); an oversized field became one reject per line and hundreds of MiB. Now a
malformed record loses only its first physical line, an oversized well-formed record is one
reject with its prefix, length and SHA-256, and ``lines_read`` lets anyone check that every
physical line of the file was loaded, rejected, or part of a record that was.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import CORPUS, Env, csv_source, run_source
from tests.unit.test_csv_scan import CASES

MALFORMED = CORPUS / "csv" / "etlsvc-malformed"
FIELDS = 'source_id = "id"\ntitle = "title"\namount = "amount"'
HEADER = "id,title,description,category,amount,url\n"



def physical_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The file's lines as a reader of physical lines sees them (\\n, \\r\\n or \\r),
    decompressed if it is gzip-compressed."""
    data = path.read_bytes()
    text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode(
        encoding, "surrogateescape")
    return io.StringIO(text, newline="").readlines()


def rows(first: int, last: int, prefix: str = "C") -> str:
    return "".join(f"{prefix}{i},title {i},desc,Books,{i}.5,https://example.com/{i}\n"
                   for i in range(first, last + 1))


@pytest.mark.parametrize("name", sorted(CASES))
async def test_a_malformed_record_costs_only_its_own_line(
    env: Env, pool: asyncpg.Pool, name: str
) -> None:
    path = MALFORMED / name
    lines = physical_lines(path)
    cfg = env.config(csv_source("m", path, fields=FIELDS, extra="max_error_rate = 1.0"))
    run = await run_source(cfg, "m")
    assert run["status"] == "succeeded", run["error"]

    rejects = await pool.fetch("SELECT position, record, reason FROM etl_rejects ORDER BY id")
    assert sorted(r["position"]["line"] for r in rejects) == CASES[name]
    for r in rejects:                       # the reject holds exactly its line
        assert r["record"]["text"] == lines[r["position"]["line"] - 1]
        assert r["reason"].startswith(("malformed CSV", "expected 6 fields"))
    # every other line is a record that loaded, under its own key
    expected = {line.split(",")[0] for n, line in enumerate(lines[1:], 2)
                if n not in CASES[name]}
    keys = {r["source_id"] for r in await pool.fetch("SELECT source_id FROM normalized_data")}
    assert keys == expected
    raw_lines = {r["line"] for r in await pool.fetch("SELECT line FROM raw_csv_data")}
    assert raw_lines | set(CASES[name]) | {1} == set(range(1, len(lines) + 1))
    assert run["lines_read"] == len(lines)
    assert run["rows_read"] == len(lines) - 1 == run["rows_valid"] + run["rows_rejected"]


async def test_a_stray_quote_in_a_large_file_costs_one_record(
    env: Env, pool: asyncpg.Pool
) -> None:
    # Before: rows C2-C16394 vanished into one rejected "field", and the run succeeded.
    path = env.dir / "stray.csv"
    path.write_text(HEADER + rows(1, 1) + 'C2,"oops,desc,Books,2,https://example.com/2\n'
                    + rows(3, 100_000))
    cfg = env.config(csv_source("big", path, fields=FIELDS))
    result = await run_source(cfg, "big")
    assert result["status"] == "succeeded", result["error"]
    assert result["rows_rejected"] == 1 and result["rows_valid"] == 99_999
    reject = await pool.fetchrow("SELECT position, reason FROM etl_rejects")
    assert reject["position"] == {"line": 3, "byte_offset": len(HEADER) + len(rows(1, 1))}
    assert "never closes" in reject["reason"]
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == 99_999
    assert not await pool.fetchval("SELECT count(*) FROM normalized_data WHERE source_id = 'C2'")
    assert result["lines_read"] == 100_001


async def test_an_oversized_well_formed_record_is_one_reject_in_bounded_memory(
    env: Env, pool: asyncpg.Pool
) -> None:
    # A 50 MB quoted field with a line break every 100 bytes, properly closed.
    path = env.dir / "huge_field.csv"
    field = "x" * 99 + "\n"
    record = f'B2,"{field * 500_000}",desc,Books,2,https://example.com/2\n'
    with open(path, "w", newline="") as f:
        f.write(HEADER + rows(1, 1, "B"))
        f.write(record)
        f.write(rows(3, 1000, "B"))
    env.write_config(csv_source("huge", path, fields=FIELDS))
    # Peak RSS of the real CLI, from its own memory map (VmHWM: getrusage's maxrss would
    # include the pytest process it was forked from).
    probe = ("import re, sys; from etlsvc.cli import main; rc = main(sys.argv[1:]); "
             "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]; "
             "print('maxrss_kib', hwm, file=sys.stderr); sys.exit(rc)")
    done = subprocess.run(
        [sys.executable, "-c", probe, "run", "--no-progress", "--config",
         str(env.dir / "config.toml")],
        capture_output=True, text=True, timeout=300, cwd=env.dir,
        env={"PATH": "/usr/bin:/bin", "ETLSVC_DATABASE_URL": env.database_url})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = [line.split() for line in done.stderr.splitlines() if line.startswith("huge")]
    assert summary and summary[0][3] == f"{1 + 1 + 500_001 + 998:,}"   # lines
    maxrss_mib = int(done.stderr.split("maxrss_kib")[1].split()[0]) / 1024
    assert maxrss_mib <= 150, f"peak RSS {maxrss_mib:.0f} MiB"

    rejects = await pool.fetch("SELECT position, record, reason FROM etl_rejects")
    assert len(rejects) == 1
    r = rejects[0]
    assert r["position"]["line"] == 3
    assert r["record"]["bytes"] == len(record.encode())
    assert r["record"]["sha256"] == hashlib.sha256(record.encode()).hexdigest()
    assert record.startswith(r["record"]["text"]) and len(r["record"]["text"]) <= 16_384
    assert "longer than max_record_bytes" in r["reason"]
    keys = {k["source_id"] for k in await pool.fetch("SELECT source_id FROM normalized_data")}
    assert keys == {f"B{i}" for i in range(1, 1001)} - {"B2"}
    run = await pool.fetchrow("SELECT * FROM etl_runs")
    assert run["lines_read"] == len(physical_lines(path)) == 1 + 1 + 500_001 + 998
    size = path.stat().st_size
    assert run["bytes_read"] == size


@pytest.mark.parametrize(("columns", "name_width", "limit"), [
    (1_000_000, 8, "max_record_bytes"),      # 8 MB: longer than a record may be
    (20_000, 6, "max_columns"),              # 140 kB, but more columns than allowed
])
async def test_a_header_too_long_or_too_wide_fails_the_run_clearly(
    env: Env, pool: asyncpg.Pool, columns: int, name_width: int, limit: str
) -> None:
    path = env.dir / "wide.csv"
    header = ",".join(f"c{i:0{name_width - 1}d}" for i in range(columns))
    path.write_text("id," + header + "\n" + "1,2\n")
    cfg = env.config(csv_source("wide", path, fields='source_id = "id"'))
    run = await run_source(cfg, "wide")
    assert run["status"] == "failed"
    assert str(path) in run["error"] and "header" in run["error"] and limit in run["error"]
    assert not await pool.fetchval("SELECT count(*) FROM raw_csv_data")
    assert not await pool.fetchval("SELECT count(*) FROM etl_checkpoints")
