"""Files that are not what the run expects: truncated in place while being read (the
``copytruncate`` log rotation), and UTF-16 under the default encoding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import asyncpg
import pytest

from tests.conftest import Env, csv_source


async def test_a_file_truncated_while_it_is_read_fails_the_run_saying_so(
        env: Env, pool: asyncpg.Pool, gen_csv) -> None:
    full, _ = gen_csv(200_000)
    path = env.dir / "app.csv"
    shutil.copy(full, path)
    env.write_config(csv_source("app", path, extra="batch_size = 2000"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "run", "app", "--config", str(env.dir / "config.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url})
    deadline = time.monotonic() + 60
    while not await pool.fetchval("SELECT count(*) FROM etl_checkpoints") and \
            time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.truncate(path, 0)                      # logrotate's copytruncate
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    run = await pool.fetchrow("SELECT * FROM etl_runs")
    assert run["status"] == "failed"
    assert f"{path}: truncated while being read (now 0 bytes" in run["error"]
    assert "copytruncate" in run["error"] and run["error"] in err
    assert 0 < run["rows_read"] < 200_000
    # What was committed is whole: the raw rows and rejects are the rows read.
    raw = await pool.fetchval("SELECT count(*) FROM raw_csv_data")
    rejects = await pool.fetchval("SELECT count(*) FROM etl_rejects")
    assert raw + rejects == run["rows_read"]


@pytest.mark.parametrize(("codec", "said"), [("utf-16-le", "UTF-16 LE"),
                                             ("utf-16-be", "UTF-16 BE"),
                                             ("utf-32-le", "UTF-32 LE")])
async def test_a_utf16_file_under_the_default_encoding_names_the_setting(
        env: Env, pool: asyncpg.Pool, codec: str, said: str) -> None:
    path = env.dir / "wide.csv"
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff",
           "utf-32-le": b"\xff\xfe\x00\x00"}[codec]
    path.write_bytes(bom + "id,title\nk1,Grüße\n".encode(codec))
    env.write_config(csv_source("wide", path, fields='source_id = "id"\ntitle = "title"'))
    done = env.cli("run", "wide")
    assert done.returncode == 1
    error = await pool.fetchval("SELECT error FROM etl_runs")
    family = codec[:6]
    assert error == (f"source 'wide': {path}: starts with a {said} byte-order mark, but "
                     f"encoding = 'utf-8'; set encoding = \"{family}\" for this source")
    check = env.cli("check")
    assert check.returncode == 1 and "byte-order mark, but encoding = 'utf-8'" in check.stderr
    # As the message says: with the setting, it loads.
    env.write_config(csv_source("wide", path, fields='source_id = "id"\ntitle = "title"',
                                extra=f'encoding = "{family}"'))
    assert env.cli("run", "wide").returncode == 0
    assert await pool.fetchval("SELECT title FROM normalized_data") == "Grüße"
