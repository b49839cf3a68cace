"""Shared fixtures: a real PostgreSQL database per test session, configs, the CLI.

``ETLSVC_TEST_DATABASE_URL`` (any database on the server; CI: the PostgreSQL on
127.0.0.1:5432) is used to create a fresh database for the session, dropped at the end.
Without it, an embedded PostgreSQL is started in a temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from etlsvc import db
from etlsvc.config import Config, load_config
from etlsvc.embedded import EmbeddedPostgres
from etlsvc.extract import KINDS

REPO = Path(__file__).resolve().parents[1]
# Third-party corpus (see tests/corpus/README.md and */SOURCES.md for origins and licenses).
CORPUS = REPO / "tests" / "corpus"
GEN_CSV = REPO / "bench" / "gen_csv.py"
TABLES = (
    "etl_runs",
    *(k.raw_table for k in KINDS.values()),
    "normalized_data",
    "etl_notifications",
    "etl_schema_columns",
    "etl_checkpoints",
    "etl_rejects",
    "data_tombstones",
    "data_history",
    "data_commits",
    "data_history_settings",
    "etl_checkpoint_history",
    "data_feed_state",
    "data_versions",
    "etl_backfills",
    "etl_sources",
    "etl_api_keys",
    "etl_audit",
    "etl_usage",
    "etl_shares",
)


#: After rows are inserted into normalized_data by hand: what etlsvc's upsert does for the
#: rows it writes (the data version of each source and kind; see 0005_change_feed.sql).
RECORD_WRITES = (
    "INSERT INTO data_versions AS v SELECT DISTINCT source, kind, 1 FROM normalized_data "
    "ON CONFLICT (source, kind) DO UPDATE SET version = v.version + 1"
)


def _with_db(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a PostgreSQL server we may create databases on."""
    url = os.environ.get("ETLSVC_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def database_url(server_dsn: str) -> Iterator[str]:
    """A fresh, migrated database for this test session."""
    name = f"etlsvc_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = _with_db(server_dsn, name)

    async def migrate() -> None:
        conn = await asyncpg.connect(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            await db.apply_migrations(pool)
        finally:
            await pool.close()
            await conn.close()

    asyncio.run(migrate())
    try:
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


#: One statement that names the tables holding rows and the sequences that have handed out
#: a value: an empty table costs the reset nothing.
_DIRTY = " UNION ALL ".join(
    [f"SELECT 'table', '{t}' WHERE EXISTS (SELECT 1 FROM {t})" for t in TABLES]
    + ["SELECT 'sequence', sequencename::text FROM pg_sequences WHERE schemaname = 'public' "
       "AND last_value IS NOT NULL AND sequencename LIKE ANY (ARRAY["
       + ", ".join(f"'{t}\\_%'" for t in TABLES) + "])"])


async def reset(p: asyncpg.Pool) -> None:
    """Empty the database as a fresh one is: TRUNCATE the tables that hold rows (TRUNCATE
    costs about 10 ms a table, even an empty one: all fifteen, before every test, cost
    140 ms) and restart the sequences that were used, so ids start at 1 again."""
    dirty = await p.fetch(_DIRTY)
    tables = [name for what, name in dirty if what == "table"]
    if tables:
        await p.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
    for what, name in dirty:
        if what == "sequence":
            await p.execute(f"ALTER SEQUENCE {name} RESTART")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the session database, emptied before the test."""
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4, init=db.init_connection)
    await reset(p)
    try:
        yield p
    finally:
        await p.close()


@dataclass
class Env:
    """A config file in a temp dir, pointing at the test database."""

    dir: Path
    database_url: str

    def write_config(self, sources: str, extra: str = "") -> Path:
        path = self.dir / "config.toml"
        path.write_text(
            textwrap.dedent(f"""\
            [database]
            url = "{self.database_url}"
            [log]
            format = "json"
            {textwrap.dedent(extra)}
            """)
            + textwrap.dedent(sources)
        )
        return path

    def config(self, sources: str, extra: str = "") -> Config:
        return load_config(self.write_config(sources, extra), environ={})

    def cli(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        """Run ``python -m etlsvc ARGS`` with this dir's config."""
        return subprocess.run(
            [sys.executable, "-m", "etlsvc", *args, "--config", str(self.dir / "config.toml")],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.dir,
            env={**os.environ, "ETLSVC_DATABASE_URL": self.database_url, **env},
        )


    def cli_peak(self, *args: str, timeout: float = 300) -> tuple[Ran, float]:
        """``cli(ARGS)``, and the peak RSS (MiB) of the largest process of its tree: the
        CLI's or one of its worker processes' (wait4 reports the largest of a process and
        the children it reaped).

        The CLI is started by a small launcher, which forks it and reports its wait4:
        Linux counts in a process's peak the memory of the image it replaced at exec, so
        a CLI started straight from this (by then large) test process would report this
        process's size."""
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "etlsvc", *args,
             "--config", str(self.dir / "config.toml")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.dir,
            start_new_session=True,
            env={**os.environ, "ETLSVC_DATABASE_URL": self.database_url})
        deadline = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        deadline.start()
        try:
            out, err = proc.communicate()
        finally:
            deadline.cancel()
        err, _, peak = err.rpartition(_PEAK)
        return Ran(proc.returncode, out, err), int(peak) / 1024


#: The launcher of ``cli_peak``: fork, exec the command, wait4, report ru_maxrss (KiB).
_PEAK = "\n@@peak-rss-kib "
_LAUNCHER = f"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write({_PEAK!r} + str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass
class Ran:
    """What a finished command said (as subprocess.CompletedProcess, for cli_peak)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
async def upstream_pg(pool: asyncpg.Pool) -> AsyncIterator[str]:
    """A schema of the test database playing the upstream PostgreSQL; its name."""
    schema = f"up_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.orders ("
                       "id bigint PRIMARY KEY, name text, amount numeric(10, 2), "
                       "updated_at timestamptz, note jsonb)")
    yield schema
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def env(tmp_path: Path, database_url: str, pool: asyncpg.Pool) -> Env:
    """A temp dir with a config writer and the CLI, on an emptied test database."""
    return Env(tmp_path, database_url)


def csv_source(
    name: str, path: str | Path, *, key: str = "id", extra: str = "", fields: str | None = None
) -> str:
    """A ``[[sources]]`` table for a CSV file (gen_csv's columns unless ``fields``)."""
    if fields is None:
        fields = f"""source_id = "{key}"
title = "title"
description = "description"
category = "category"
amount = "amount"
url = "url"
tags = "tags"
event_time = "created_at"
"""
    return f"""
[[sources]]
name = "{name}"
kind = "csv"
path = "{path}"
{extra}
[sources.fields]
{fields}
"""


def log_events(stdout: str) -> list[dict[str, Any]]:
    """The JSON log lines of a CLI run."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def gen_csv(tmp_path_factory: pytest.TempPathFactory):
    """Make (and cache for the session) a file with ../shared/bench/gen_csv.py."""
    made: dict[tuple[int, float], tuple[Path, Path]] = {}
    folder = tmp_path_factory.mktemp("gen")

    def make(rows: int, bad_rate: float = 0.01) -> tuple[Path, Path]:
        if (rows, bad_rate) not in made:
            out, clean = folder / f"{rows}_{bad_rate}.csv", folder / f"{rows}_{bad_rate}_clean.csv"
            subprocess.run(
                [
                    sys.executable,
                    str(GEN_CSV),
                    str(rows),
                    str(out),
                    "--clean",
                    str(clean),
                    "--bad-rate",
                    str(bad_rate),
                ],
                check=True,
                capture_output=True,
            )
            made[rows, bad_rate] = (out, clean)
        return made[rows, bad_rate]

    return make


_WORKERS: list[Any] = []


def shared_workers() -> Any:
    """The worker processes of this test session, made as ``etlsvc run`` makes its own (the
    default ``[pipeline]``), once: every in-process run parses in them."""
    from etlsvc.config import PipelineConfig
    from etlsvc.runtime.workers import from_config

    if not _WORKERS:
        _WORKERS.append(from_config(PipelineConfig()))
    return _WORKERS[0]


@pytest.fixture(scope="session", autouse=True)
def _stop_workers() -> Iterator[None]:
    yield
    for workers in _WORKERS:
        workers.shutdown()


async def run_source(cfg: Config, name: str, **kwargs: Any) -> dict[str, Any]:
    """Run one source in this process; return its finished etl_runs row."""
    from etlsvc.runtime import notify, pipeline

    async with db.open_database(cfg) as database:
        row = await pipeline.run_source(database, cfg, cfg.source(name), shared_workers(),
                                        **kwargs)
        await notify.drain(database.pool)   # as `etlsvc run` does, before the pool closes
        return row


@pytest.fixture
def upstream():
    """A real HTTP server on 127.0.0.1 (see tests/upstream.py)."""
    from tests.upstream import serve

    yield from serve()


def api_source(name: str, url: str, fields: str, extra: str = "") -> str:
    """A ``[[sources]]`` table for an API."""
    return f"""
[[sources]]
name = "{name}"
kind = "api"
url = "{url}"
{extra}
[sources.fields]
{fields}
"""


@pytest.fixture(scope="session")
def json_server_bin() -> Path:
    """json-server 0.17.4 from npm, installed once into .tools/ of the repository."""
    import shutil

    tools = REPO / ".tools"
    binary = tools / "node_modules" / ".bin" / "json-server"
    if not binary.exists():
        if not shutil.which("npm"):
            pytest.skip("json-server needs npm (Node.js); .ci/run installs it")
        subprocess.run(
            [
                "npm",
                "install",
                "--silent",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(tools),
                "json-server@0.17.4",
            ],
            check=True,
            capture_output=True,
        )
    return binary


@pytest.fixture
def json_server(json_server_bin: Path, tmp_path: Path) -> Iterator[str]:
    """A real json-server on 127.0.0.1 serving the corpus' db.json; yields its base URL."""
    import shutil
    import socket
    import time

    db = tmp_path / "db.json"
    shutil.copy(CORPUS / "api" / "json-server" / "db.json", db)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(json_server_bin), "--host", "127.0.0.1", "--port", str(port), str(db)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait()


def descendants(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        todo += list(kids - found)
        found |= kids
    return found


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A PostgreSQL cluster of the test's own (tests/clusters.py), to stop, kill or freeze."""
    from tests.clusters import Cluster, scratch_dir

    with scratch_dir() as folder:
        c = Cluster(folder / "pg")
        try:
            yield c
        finally:
            c.server.stop()
