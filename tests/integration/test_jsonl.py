"""Kind jsonl: JSON Lines files, plain or gzip-compressed, resumable, one reject per bad line."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import CORPUS, Env, run_source

NETBOX = sorted((CORPUS / "api" / "netbox-drf-pynetbox").rglob("*.json"))


def jsonl_source(name: str, path: str | Path, *, fields: str = 'source_id = "id"',
                 extra: str = "") -> str:
    return f"""
[[sources]]
name = "{name}"
kind = "jsonl"
path = "{path}"
{extra}
[sources.fields]
{fields}
"""


FIELDS = 'source_id = "id"\ntitle = "name"\namount = "price.amount"\nevent_time = "at"'

GOOD = [
    {"id": "a1", "name": "first", "price": {"amount": 12.5}, "at": "2024-05-01T12:00:00Z"},
    {"id": "a2", "name": "second", "price": {"amount": "7"}, "tags": ["x"]},
]


def lines(*items: object) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


async def test_every_line_is_a_record_or_a_reject_with_its_line_and_offset(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    bad_json = b'{"id": "b1", "name": \n'
    body = (lines(GOOD[0]) + b"\n" + bad_json + b'["not", "an", "object"]\n' +
            b'{"id": "n1", "name": "nul \\u0000 inside"}\n' +
            lines({"id": "c1", "price": {"amount": "twelve"}}, GOOD[1]))
    path = tmp_path / "items.jsonl"
    path.write_bytes(body)
    cfg = env.config(jsonl_source("j", path, fields=FIELDS, extra="max_error_rate = 1.0"))
    run = await run_source(cfg, "j")
    assert run["status"] == "succeeded", run["error"]
    assert (run["rows_read"], run["rows_valid"], run["rows_rejected"]) == (6, 2, 4)
    assert run["lines_read"] == 7 and run["bytes_read"] == len(body)
    rejects = await pool.fetch(
        "SELECT stream, position, reason FROM etl_rejects ORDER BY (position->>'line')::int")
    starts = [0, *(i + 1 for i, b in enumerate(body) if b == ord("\n"))]
    assert [(r["position"]["line"], r["position"]["byte_offset"]) for r in rejects] == [
        (3, starts[2]), (4, starts[3]), (5, starts[4]), (6, starts[5])]
    assert all(r["stream"] == str(path) for r in rejects)
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == "the record is not a JSON object"
    assert "NUL" in reasons[2]
    assert reasons[3] == "amount (column 'price.amount') is not a number: 'twelve'"
    raw = await pool.fetch("SELECT line, byte_offset, record FROM raw_jsonl_data ORDER BY id")
    assert [(r["line"], r["byte_offset"], r["record"]) for r in raw] == [
        (1, 0, GOOD[0]), (7, starts[6], GOOD[1])]
    rows = await pool.fetch(
        "SELECT kind, source_id, title, amount::text, event_time IS NOT NULL AS timed "
        "FROM normalized_data ORDER BY source_id")
    assert [tuple(r) for r in rows] == [("jsonl", "a1", "first", "12.5", True),
                                        ("jsonl", "a2", "second", "7", False)]


async def test_an_appended_file_resumes_at_its_offset_and_an_edited_one_starts_over(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "grow.jsonl"
    path.write_bytes(lines(*({"id": str(i)} for i in range(100))))
    cfg = env.config(jsonl_source("g", path, fields='source_id = "id"\ntitle = "v"',
                                  extra="batch_size = 30"))
    assert (await run_source(cfg, "g"))["rows_read"] == 100
    added = lines(*({"id": str(i)} for i in range(100, 130)))
    with path.open("ab") as f:
        f.write(added)
    second = await run_source(cfg, "g")
    assert (second["rows_read"], second["bytes_read"]) == (30, len(added))
    assert await pool.fetchval("SELECT count(*) FROM raw_jsonl_data") == 130
    assert await pool.fetchval("SELECT min(line) FROM raw_jsonl_data WHERE run_id = $1",
                               second["id"]) == 101
    path.write_bytes(b'{"id": "0", "v": 2}\n' + path.read_bytes().split(b"\n", 1)[1])
    third = await run_source(cfg, "g")
    assert third["rows_read"] == 130 and third["rows_updated"] == 1
    assert third["rows_unchanged"] == 129


async def test_a_gzip_file_loads_like_the_plain_one_and_resumes_past_what_it_committed(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    first = lines(*({"id": str(i), "name": f"n{i}"} for i in range(2500)))
    path = tmp_path / "items.jsonl.gz"
    path.write_bytes(gzip.compress(first))
    cfg = env.config(jsonl_source("z", path, fields='source_id = "id"\ntitle = "name"',
                                  extra="batch_size = 1000"))
    run = await run_source(cfg, "z")
    assert (run["status"], run["rows_read"], run["bytes_read"]) == ("succeeded", 2500,
                                                                     len(first))
    state = await pool.fetchval("SELECT state FROM etl_checkpoints")
    assert state["offset"] == len(first)
    assert state["fingerprint"] == hashlib.sha256(first).hexdigest()
    # Appending a gzip member (what `gzip >> file` does): only the new lines are loaded.
    more = lines({"id": "2500", "name": "late"})
    with path.open("ab") as f:
        f.write(gzip.compress(more))
    again = await run_source(cfg, "z")
    assert (again["rows_read"], again["rows_inserted"]) == (1, 1)
    raw = await pool.fetchrow("SELECT line, byte_offset FROM raw_jsonl_data WHERE run_id = $1",
                              again["id"])
    assert (raw["line"], raw["byte_offset"]) == (2501, len(first))
    # Recompressed with other content before the offset: read again from the start.
    path.write_bytes(gzip.compress(b'{"id": "0", "name": "changed"}\n' +
                                   first.split(b"\n", 1)[1] + more))
    third = await run_source(cfg, "z")
    assert (third["rows_read"], third["rows_updated"]) == (2501, 1)


async def test_a_truncated_gzip_file_fails_the_run_clearly_after_loading_what_it_could(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(lines(*({"id": str(i)} for i in range(50))))[:-20])
    run = await run_source(env.config(jsonl_source("t", path)), "t")
    assert run["status"] == "failed"
    assert f"{path}: the gzip stream is truncated" in run["error"]


async def test_a_line_over_max_record_bytes_is_one_reject_and_loading_goes_on(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    huge = json.dumps({"id": "big", "blob": "x" * 3_000_000}).encode()
    body = lines({"id": "1"}) + huge + b"\n" + lines({"id": "2"})
    path = tmp_path / "big.jsonl"
    path.write_bytes(body)
    cfg = env.config(jsonl_source("b", path, extra="max_error_rate = 1.0"))
    run = await run_source(cfg, "b")
    assert (run["rows_valid"], run["rows_rejected"], run["bytes_read"]) == (2, 1, len(body))
    reject = await pool.fetchrow("SELECT position, record, reason FROM etl_rejects")
    assert reject["position"] == {"line": 2, "byte_offset": len(lines({"id": "1"}))}
    assert reject["record"]["bytes"] == len(huge)
    assert reject["record"]["sha256"] == hashlib.sha256(huge).hexdigest()
    assert "longer than max_record_bytes" in reject["reason"]
    assert await pool.fetchval("SELECT array_agg(line ORDER BY line) FROM raw_jsonl_data") == [
        1, 3]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
async def test_recorded_api_items_as_json_lines_load_exactly(
    env: Env, pool: asyncpg.Pool, tmp_path: Path, compressed: bool
) -> None:
    docs = [json.loads(path.read_text()) for path in NETBOX]
    items = [i for d in docs for i in (d["results"] if isinstance(d, dict) else d)]
    body = b"".join(json.dumps(i, indent=None).encode() + b"\n" for i in items)
    path = tmp_path / ("netbox.jsonl.gz" if compressed else "netbox.jsonl")
    path.write_bytes(gzip.compress(body) if compressed else body)
    cfg = env.config(jsonl_source("nb", path, fields='source_id = "id"\ntitle = "display"',
                                  extra="max_error_rate = 1.0"))
    run = await run_source(cfg, "nb")
    assert run["status"] == "succeeded", run["error"]
    with_id = [i for i in items if "id" in i]
    assert (run["rows_read"], run["rows_valid"]) == (len(items), len(with_id))
    raw = await pool.fetch("SELECT record FROM raw_jsonl_data ORDER BY line")
    assert [r["record"] for r in raw] == with_id
    rejects = await pool.fetch("SELECT record, reason FROM etl_rejects ORDER BY id")
    assert [r["record"] for r in rejects] == [i for i in items if "id" not in i]
    assert all(r["reason"].startswith("source_id (column 'id')") for r in rejects)
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == len(
        {str(i["id"]) for i in with_id})


async def test_a_gzip_csv_file_loads_like_the_plain_one(
    env: Env, pool: asyncpg.Pool, tmp_path: Path, gen_csv
) -> None:
    from tests.conftest import csv_source

    plain, _ = gen_csv(3000)
    path = tmp_path / "gen.csv.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    cfg = env.config(csv_source("p", plain) + csv_source("z", path))
    a, b = await run_source(cfg, "p"), await run_source(cfg, "z")
    assert b["status"] == "succeeded", b["error"]
    for k in ("rows_read", "rows_valid", "rows_rejected", "lines_read", "bytes_read"):
        assert a[k] == b[k], k
    assert await pool.fetchval(
        "SELECT count(*) FROM (SELECT line, byte_offset, record FROM raw_csv_data "
        "WHERE source = 'p' EXCEPT SELECT line, byte_offset, record FROM raw_csv_data "
        "WHERE source = 'z') d") == 0
