"""The real-world CSV corpus: exact loads for csv-spectrum; no crash, no hang elsewhere."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import asyncpg
import pytest

from etlsvc.extract.csv_files import CsvSource, read_header
from tests.conftest import CORPUS, Env, csv_source, run_source
from tests.integration.test_csv_malformed import physical_lines

SPECTRUM = sorted((CORPUS / "csv" / "csv-spectrum" / "csvs").glob("*.csv"))
OTHERS = sorted(
    p
    for p in (CORPUS / "csv").rglob("*")
    if p.is_file() and "csv-spectrum" not in p.parts and p.suffix != ".md"
)


def first_column(path: Path, encoding: str = "utf-8") -> str:
    src = CsvSource(name="x", path=str(path), fields=None, encoding=encoding)  # type: ignore[arg-type]
    header = read_header(src, str(path))
    return header[0] if header else "id"


@pytest.mark.parametrize("path", SPECTRUM, ids=[p.stem for p in SPECTRUM])
async def test_csv_spectrum_loads_exactly_the_expected_records(
    env: Env, pool: asyncpg.Pool, path: Path
) -> None:
    expected = json.loads((path.parent.parent / "json" / f"{path.stem}.json").read_text())
    key = next(iter(expected[0]))
    cfg = env.config(csv_source("spectrum", path, fields=f'source_id = "{key}"'))
    run = await run_source(cfg, "spectrum")
    assert run["status"] == "succeeded", run["error"]
    raw = await pool.fetch("SELECT record FROM raw_csv_data ORDER BY line")
    assert [r["record"] for r in raw] == expected
    assert run["rows_read"] == run["rows_valid"] == len(expected)
    assert run["rows_rejected"] == 0
    keys = await pool.fetch("SELECT source_id FROM normalized_data ORDER BY id")
    assert [k["source_id"] for k in keys] == [e[key] for e in expected]


@pytest.mark.parametrize("path", OTHERS, ids=[str(p.relative_to(CORPUS / "csv")) for p in OTHERS])
async def test_every_other_corpus_file_loads_or_fails_clearly(
    env: Env, pool: asyncpg.Pool, path: Path
) -> None:
    encoding = "utf-16" if "utf16" in path.name or "utf-16" in path.name else "utf-8"
    extra = f'encoding = "{encoding}"\nmax_error_rate = 1.0'
    if path.suffix == ".tsv":
        extra += '\ndelimiter = "\\t"'
    cfg = env.config(
        csv_source(
            "corpus",
            path,
            fields=f"source_id = {json.dumps(first_column(path, encoding))}",
            extra=extra,
        )
    )
    run = await asyncio.wait_for(run_source(cfg, "corpus"), timeout=60)
    if run["status"] == "failed":
        assert str(path) in run["error"] and "internal error" not in run["error"], run["error"]
    else:
        assert run["status"] == "succeeded"
    assert run["rows_read"] == run["rows_valid"] + run["rows_rejected"]
    rejects = await pool.fetch("SELECT position, reason FROM etl_rejects")
    assert len(rejects) == run["rows_rejected"]
    assert all(r["reason"] and r["position"]["line"] >= 1 for r in rejects)
    raw = await pool.fetchval("SELECT count(*) FROM raw_csv_data")
    assert raw == run["rows_valid"]
    if run["status"] == "succeeded":      # every physical line is accounted for
        assert run["lines_read"] == len(physical_lines(path, encoding))


async def test_nul_bytes_are_rejected_with_a_reason(env: Env, pool: asyncpg.Pool) -> None:
    path = CORPUS / "csv" / "csvkit" / "null_byte.csv"
    assert b"\x00" in path.read_bytes()
    cfg = env.config(
        csv_source("nul", path, fields='source_id = "a"', extra="max_error_rate = 1.0")
    )
    run = await run_source(cfg, "nul")
    rejects = await pool.fetch("SELECT reason, record FROM etl_rejects")
    assert run["rows_rejected"] == len(rejects) >= 1
    assert all(r["reason"] == "NUL character in the record" for r in rejects)
    assert "\\x00" in rejects[0]["record"]["text"]
    assert not await pool.fetchval(
        "SELECT count(*) FROM raw_csv_data WHERE record::text LIKE '%\\u0000%'"
    )


async def test_undecodable_bytes_are_rejected_or_decoded_as_configured(
    env: Env, pool: asyncpg.Pool
) -> None:
    path = CORPUS / "csv" / "csvkit" / "test_latin1.csv"
    cfg = env.config(
        csv_source("latin", path, fields='source_id = "a"', extra="max_error_rate = 1.0")
    )
    run = await run_source(cfg, "latin")
    reasons = [r["reason"] for r in await pool.fetch("SELECT reason FROM etl_rejects")]
    assert reasons and set(reasons) == {"bytes that are not valid utf-8 in the record"}
    assert run["rows_rejected"] == len(reasons)

    cfg = env.config(
        csv_source("latin", path, fields='source_id = "a"', extra='encoding = "latin-1"')
    )
    run = await run_source(cfg, "latin", full_refresh=True)
    assert run["status"] == "succeeded" and run["rows_rejected"] == 0
    # Each record is the file's row as Latin-1 reads it: "©" (byte A9), not mojibake.
    rows = await pool.fetch(
        "SELECT record::text FROM raw_csv_data WHERE run_id = $1 ORDER BY line", run["id"])
    records = [json.loads(r[0]) for r in rows]
    expected = list(csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"))))
    assert records == expected and records[1]["c"] == "©"


async def test_undecodable_header_fails_the_run_with_advice(env: Env, pool: asyncpg.Pool) -> None:
    path = CORPUS / "csv" / "messytables" / "spanish_chars.csv"
    cfg = env.config(csv_source("es", path, fields='source_id = "GF_ID"'))
    run = await run_source(cfg, "es")
    assert run["status"] == "failed"
    assert run["error"] == (
        f"source 'es': {path}, line 1: the header has bytes that are not "
        "valid utf-8: set `encoding` for this source"
    )
    assert not await pool.fetchval("SELECT count(*) FROM etl_checkpoints")


async def test_bom_and_utf16_files_decode(env: Env, pool: asyncpg.Pool) -> None:
    bom = CORPUS / "csv" / "csvkit" / "test_utf8_bom.csv"
    cfg = env.config(csv_source("bom", bom, fields=f'source_id = "{first_column(bom)}"'))
    run = await run_source(cfg, "bom")
    assert run["status"] == "succeeded" and run["rows_rejected"] == 0
    header = await pool.fetchval("SELECT record FROM raw_csv_data LIMIT 1")
    assert not any(k.startswith("\ufeff") for k in header)

    utf16 = CORPUS / "csv" / "csvkit" / "test_utf16_little.csv"
    cfg = env.config(
        csv_source(
            "u16",
            utf16,
            extra='encoding = "utf-16"',
            fields=f'source_id = "{first_column(utf16, "utf-16")}"',
        )
    )
    run = await run_source(cfg, "u16")
    assert run["status"] == "succeeded" and run["rows_valid"] > 0
