"""Loading semantics: rejects, idempotence, updates, appends, replay, runs and their logs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import asyncpg

from tests.conftest import Env, csv_source, log_events, run_source


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def write_rows(path: Path, rows: list[list[str]], mode: str = "w") -> None:
    with open(path, mode, newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


async def test_exactly_the_bad_rows_are_rejected_with_the_field_named(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    full, clean = gen_csv(20_000)
    cfg = env.config(csv_source("products", full, extra="batch_size = 3000"))
    run = await run_source(cfg, "products")
    assert run["status"] == "succeeded", run["error"]

    clean_ids = {r[0] for r in read_rows(clean)[1:]}
    bad_rows = [r for r in read_rows(full)[1:] if r[0] not in clean_ids]
    assert len(bad_rows) > 150  # ~1 % of 20,000
    assert run["rows_read"] == 20_000
    assert run["rows_rejected"] == len(bad_rows)
    assert run["rows_valid"] == run["rows_inserted"] == len(clean_ids)

    normalized = {r["source_id"] for r in await pool.fetch("SELECT source_id FROM normalized_data")}
    assert normalized == clean_ids
    rejects = await pool.fetch("SELECT record, reason, position FROM etl_rejects ORDER BY id")
    assert sorted(r["record"]["id"] for r in rejects) == sorted(r[0] for r in bad_rows)
    for r in rejects:
        rec, reason = r["record"], r["reason"]
        if rec["id"] == "":
            assert reason.startswith("source_id (column 'id') is required but empty")
        elif reason.startswith("amount"):
            assert f"is not a number: {rec['amount']!r}" in reason
        else:
            assert reason.startswith("event_time (column 'created_at')"), reason
            assert repr(rec["created_at"]) in reason
    # positions point at the record in the file
    data = full.read_bytes()
    for r in rejects[:50]:
        offset = r["position"]["byte_offset"]
        assert data[offset:].startswith(r["record"]["id"].encode() + b",")


async def test_rerun_changed_rows_and_appended_rows(env: Env, pool: asyncpg.Pool, gen_csv) -> None:
    source, _ = gen_csv(5_000)
    path = env.dir / "products.csv"
    shutil.copy(source, path)
    cfg = env.config(csv_source("products", path, extra="batch_size = 1000"))
    first = await run_source(cfg, "products")
    valid = first["rows_valid"]
    assert first["rows_inserted"] == valid > 4_900

    again = await run_source(cfg, "products")
    assert (again["rows_read"], again["bytes_read"]) == (0, 0)
    assert (again["rows_inserted"], again["rows_updated"]) == (0, 0)

    # The same bytes written again: still nothing to read.
    rows = read_rows(path)
    write_rows(path, rows)
    same = await run_source(cfg, "products")
    assert (same["rows_read"], same["bytes_read"]) == (0, 0)

    # Ten rows change: exactly ten updates.
    changed = [i for i in range(1, len(rows), 97)][:10]
    for i in changed:
        rows[i][1] = f"Changed title {i}"
    write_rows(path, rows)
    upd = await run_source(cfg, "products")
    assert upd["rows_read"] == 5_000  # changed before the offset: read again
    assert (upd["rows_inserted"], upd["rows_updated"], upd["rows_unchanged"]) == (0, 10, valid - 10)
    titles = await pool.fetch("SELECT title FROM normalized_data WHERE title LIKE 'Changed%'")
    assert len(titles) == 10

    # Appended rows: only the new bytes are read.
    size = path.stat().st_size
    new = [
        [
            f"NEW-{i}",
            f"New {i}",
            "d",
            "Books",
            "1.00",
            "https://x.example/",
            "2024-01-01T00:00:00Z",
            "new",
        ]
        for i in range(100)
    ]
    write_rows(path, new, mode="a")
    app = await run_source(cfg, "products")
    assert app["bytes_read"] == path.stat().st_size - size
    assert (app["rows_read"], app["rows_inserted"], app["rows_updated"]) == (100, 100, 0)
    checkpoint = await pool.fetchval("SELECT state FROM etl_checkpoints")
    assert checkpoint["offset"] == path.stat().st_size


async def test_duplicate_keys_in_one_batch_later_record_wins(env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "dups.csv"
    write_rows(path, [["id", "title"], ["a", "first"], ["b", "only"], ["a", "second"]])
    cfg = env.config(csv_source("dups", path, fields='source_id = "id"\ntitle = "title"'))
    run = await run_source(cfg, "dups")
    assert (run["rows_valid"], run["rows_inserted"], run["rows_unchanged"]) == (3, 2, 1)
    rows = await pool.fetch(
        "SELECT source_id, title, raw_id FROM normalized_data ORDER BY source_id"
    )
    assert [(r["source_id"], r["title"]) for r in rows] == [("a", "second"), ("b", "only")]
    line = await pool.fetchval("SELECT line FROM raw_csv_data WHERE id = $1", rows[0]["raw_id"])
    assert line == 4


async def test_lineage_points_at_the_raw_row_and_run(env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "one.csv"
    write_rows(
        path,
        [
            ["id", "amount", "when", "tags"],
            ["k1", "12.50", "2024-05-01T12:00:00+02:00", "x;y"],
            ["k2", "", "", ""],
        ],
    )
    cfg = env.config(
        csv_source(
            "one",
            path,
            fields='source_id = "id"\namount = "amount"\nevent_time = "when"\ntags = "tags"',
        )
    )
    run = await run_source(cfg, "one")
    row = await pool.fetchrow(
        "SELECT n.*, r.record, r.line, r.byte_offset FROM normalized_data n "
        "JOIN raw_csv_data r ON r.id = n.raw_id WHERE n.source_id = 'k1'"
    )
    assert row["raw_table"] == "raw_csv_data" and row["run_id"] == run["id"]
    assert row["record"] == {
        "id": "k1",
        "amount": "12.50",
        "when": "2024-05-01T12:00:00+02:00",
        "tags": "x;y",
    }
    assert (row["line"], row["byte_offset"]) == (2, len("id,amount,when,tags\n"))
    assert str(row["amount"]) == "12.50" and row["tags"] == ["x", "y"]
    assert row["event_time"].isoformat() == "2024-05-01T10:00:00+00:00"
    blank = await pool.fetchrow(
        "SELECT amount, event_time, tags FROM normalized_data WHERE source_id = 'k2'"
    )
    assert (blank["amount"], blank["event_time"], blank["tags"]) == (None, None, [])


async def test_error_rate_above_threshold_fails_run_but_keeps_rows(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    full, clean = gen_csv(2_000, bad_rate=0.2)
    env.write_config(csv_source("products", full))
    result = env.cli("run", "products")
    assert result.returncode == 1
    run = await pool.fetchrow("SELECT * FROM etl_runs")
    assert run["status"] == "failed"
    assert (
        "records rejected" in run["error"]
        and "above the source's max_error_rate of 5.0%" in run["error"]
    )
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == len(read_rows(clean)) - 1


async def test_summary_log_event_equals_the_runs_row(env: Env, pool: asyncpg.Pool, gen_csv) -> None:
    full, _ = gen_csv(5_000)
    env.write_config(csv_source("products", full, extra="batch_size = 1000"))
    result = env.cli("run", "products")
    assert result.returncode == 0, result.stderr
    events = log_events(result.stdout)
    summary = [e for e in events if e["event"] == "run finished"]
    assert len(summary) == 1
    run = await pool.fetchrow("SELECT * FROM etl_runs")
    assert summary[0]["run_id"] == run["id"] and summary[0]["source"] == "products"
    for key in (
        "rows_read",
        "rows_valid",
        "rows_rejected",
        "rows_inserted",
        "rows_updated",
        "rows_unchanged",
        "bytes_read",
    ):
        assert summary[0][key] == run[key], key
    assert all(
        e.get("run_id") == run["id"]
        for e in events
        if e["event"] in ("run started", "reading file", "run finished")
    )
    assert "products" in result.stderr and "succeeded" in result.stderr  # summary table


async def test_a_running_source_is_not_run_twice(env: Env, pool: asyncpg.Pool, gen_csv) -> None:
    full, _ = gen_csv(2_000)
    env.write_config(csv_source("products", full))
    async with pool.acquire() as conn:
        running = await conn.fetchval(
            "INSERT INTO etl_runs (source, kind, trigger, heartbeat_at) "
            "VALUES ('products', 'csv', 'manual', now() - interval '10 minutes') RETURNING id"
        )
        await conn.execute("SELECT pg_advisory_lock(hashtextextended('etlsvc:source:products', 0))")
        result = env.cli("run", "products")
        await conn.execute("SELECT pg_advisory_unlock_all()")
    assert result.returncode == 1
    assert f"source 'products' is already running (run {running})" in result.stderr
    assert await pool.fetchval("SELECT count(*) FROM etl_runs") == 1
    # Once the lock is free, the stale 'running' row is closed and a new run happens.
    assert env.cli("run", "products").returncode == 0
    stale = await pool.fetchrow("SELECT status, error FROM etl_runs WHERE id = $1", running)
    assert stale["status"] == "interrupted"
    assert stale["error"].startswith("interrupted: its process (pid ? on ?) stopped")


async def test_replay_renormalizes_from_raw_rows_without_the_file(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    full, _ = gen_csv(3_000)
    path = env.dir / "products.csv"
    shutil.copy(full, path)
    env.write_config(csv_source("products", path))
    assert env.cli("run").returncode == 0
    before = await pool.fetchval("SELECT count(*) FROM normalized_data")
    path.unlink()  # replay must not need the file
    env.write_config(csv_source("products", path).replace('title = "title"', 'title = "category"'))
    result = env.cli("replay", "products")
    assert result.returncode == 0, result.stderr
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == before
    assert not await pool.fetchval(
        "SELECT count(*) FROM normalized_data WHERE title IS DISTINCT FROM category"
    )
    run = await pool.fetchrow("SELECT * FROM etl_runs WHERE trigger = 'replay'")
    assert run["status"] == "succeeded" and run["rows_updated"] == before

    # A mapping under which the raw rows are invalid: above the error threshold, the replay
    # is rolled back and says why.
    env.write_config(
        csv_source("products", path).replace('amount = "amount"', 'amount = "description"')
    )
    result = env.cli("replay", "products")
    assert result.returncode == 1
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == before
    failed = await pool.fetchrow(
        "SELECT * FROM etl_runs WHERE trigger = 'replay' AND status = 'failed'"
    )
    assert failed["error"].startswith(
        f"source 'products': replay rolled back: {before} of {before} records rejected"
    )
    assert "first reason: amount (column 'description') is not a number" in failed["error"]


async def test_a_glob_reads_every_matching_file_with_its_own_checkpoint(
    env: Env, pool: asyncpg.Pool
) -> None:
    (env.dir / "in").mkdir()
    write_rows(env.dir / "in" / "a.csv", [["id", "title"], ["a1", "x"], ["a2", "y"]])
    write_rows(env.dir / "in" / "b.csv", [["id", "title"], ["b1", "z"]])
    (env.dir / "in" / "notes.txt").write_text("not matched")
    cfg = env.config(csv_source("many", "in/*.csv", fields='source_id = "id"\ntitle = "title"'))
    run = await run_source(cfg, "many")
    assert (run["status"], run["rows_read"], run["rows_inserted"]) == ("succeeded", 3, 3)
    streams = {r["stream"] for r in await pool.fetch("SELECT stream FROM etl_checkpoints")}
    assert streams == {str(env.dir / "in" / "a.csv"), str(env.dir / "in" / "b.csv")}
    write_rows(env.dir / "in" / "c.csv", [["id", "title"], ["c1", "w"]])
    run = await run_source(cfg, "many")
    assert (run["rows_read"], run["rows_inserted"]) == (1, 1)
    files = await pool.fetch("SELECT DISTINCT file FROM raw_csv_data ORDER BY file")
    assert [Path(r["file"]).name for r in files] == ["a.csv", "b.csv", "c.csv"]


async def test_an_unterminated_quote_costs_only_its_own_line(
    env: Env, pool: asyncpg.Pool
) -> None:
    path = env.dir / "quote.csv"
    rows = [["id", "title"]] + [[f"k{i}", f"t{i}"] for i in range(5)]
    write_rows(path, rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write('bad,"never closed\n')
        f.writelines(f"m{i},{'x' * 100}\n" for i in range(30_000))  # ~3 MB after it
    cfg = env.config(
        csv_source(
            "q",
            path,
            fields='source_id = "id"\ntitle = "title"',
            extra="max_record_bytes = 1000\nmax_error_rate = 1.0",
        )
    )
    run = await run_source(cfg, "q")
    assert run["status"] == "succeeded"
    rejects = await pool.fetch("SELECT position, reason FROM etl_rejects")
    assert [r["position"]["line"] for r in rejects] == [7]      # the bad line, alone
    assert "never closes" in rejects[0]["reason"]
    keys = {r["source_id"] for r in await pool.fetch("SELECT source_id FROM normalized_data")}
    assert keys == {f"k{i}" for i in range(5)} | {f"m{i}" for i in range(30_000)}
    assert run["rows_read"] == run["rows_valid"] + run["rows_rejected"] == 30_006
    assert run["lines_read"] == 30_007


async def test_a_postgresql_error_mid_run_is_reported_as_a_database_error(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    full, _ = gen_csv(2_000)
    await pool.execute("""
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'refused by a trigger' USING ERRCODE = 'P0001'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON etl_rejects FOR EACH ROW EXECUTE FUNCTION refuse();
    """)
    try:
        run = await run_source(env.config(csv_source("products", full)), "products")
    finally:
        await pool.execute("DROP TRIGGER refuse ON etl_rejects; DROP FUNCTION refuse()")
    assert run["status"] == "failed"
    assert run["error"] == "database error: P0001: refused by a trigger"
