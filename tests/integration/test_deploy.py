"""Deployment: the wheel alone carries everything; replicas share the work; lint of the
container files lives in .ci/run (hadolint, compose)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx

from tests.conftest import REPO, Env, csv_source
from tests.integration.test_service import free_port, servers


def test_the_installed_wheel_checks_and_migrates_outside_the_source_tree(
    tmp_path: Path, database_url: str
) -> None:
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(dist.glob("etlsvc-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    # Its dependencies are this interpreter's (installing them again is the Quickstart's
    # and the image's test, and half a minute): a path line, so the checkout's editable
    # etlsvc, which a .pth file there makes importable, stays out.
    purelib = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(f"{purelib}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETLSVC_")}
    env |= {"ETLSVC_DATABASE_URL": database_url, "PYTHONPATH": ""}
    etlsvc = str(venv / "bin" / "etlsvc")
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import etlsvc.db as d; print(d.sql_dir())"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(venv) in where.stdout  # not the source tree's sql/
    assets = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "from etlsvc.api import console as c; "
         "print(c.STATIC, sorted(c.VENDORED), (c.STATIC / 'console/console.js').is_file())"],
        cwd=work, env=env, capture_output=True, text=True, check=True)
    # The console and the API docs' files ship in the wheel.
    assert assets.stdout.split(" ", 1)[0].startswith(str(venv))
    assert "['redoc.standalone.js', 'swagger-ui-bundle.js', 'swagger-ui-standalone-preset.js', " \
        "'swagger-ui.css'] True" in assets.stdout
    migrate = subprocess.run(
        [etlsvc, "migrate"], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert migrate.returncode == 0, migrate.stderr
    check = subprocess.run(
        [etlsvc, "check"], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr
    assert "ok   source products: 1 file(s), mapped columns present" in check.stderr
    assert "migrations: 0 pending" in check.stderr


async def test_three_replicas_one_run_per_tick_all_serve_data(
    env: Env, pool: asyncpg.Pool, gen_csv
) -> None:
    full, _ = gen_csv(20_000)
    env.write_config(csv_source("products", full, extra='schedule = "3s"\nbatch_size = 2000'))
    with servers(env, 3) as trio:
        # Ticks count from the moment all three are up (a loaded machine can take a tick or
        # two to start the last one), and at least two of them (a run may outlast a tick).
        up = dt.datetime.now(dt.UTC)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and await pool.fetchval(
                "SELECT count(*) FROM etl_runs WHERE status = 'succeeded' AND started_at >= $1",
                up) < 2:
            await asyncio.sleep(0.5)
        for server in trio:
            r = httpx.get(f"{server.base}/data", params={"limit": 5})
            assert r.status_code == 200 and len(r.json()["data"]) == 5
        listed = httpx.get(f"{trio[0].base}/etl/runs", params={"limit": 100}).json()["data"]
    runs = await pool.fetch("SELECT * FROM etl_runs ORDER BY id")
    # One history, whichever replica is asked: the listing holds every run up to its newest
    # (a tick may add one after the listing, as the replicas stop).
    shown = {r["id"] for r in listed}
    assert shown == {r["id"] for r in runs if r["id"] <= max(shown)}
    ticks = Counter(tick(r["started_at"]) for r in runs)
    assert all(n == 1 for n in ticks.values()), ticks  # one run per tick
    skips = Counter(tick(dt.datetime.fromisoformat(line["timestamp"]))
                    for s in trio for line in map(json.loads, skipped_lines(s.output)))
    # The two ticks waited for (a later one may have come as the replicas stopped).
    watched = [tick(r["started_at"]) for r in runs
               if r["started_at"] >= up and r["status"] == "succeeded"][:2]
    assert len(watched) == 2, runs
    # At each of them, the two replicas that did not run the source skipped it.
    assert [skips[t] for t in watched] == [2] * len(watched), (watched, skips)


def skipped_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if '"scheduled run skipped' in line]


def tick(at: dt.datetime) -> int:
    """The 3 s schedule's tick an instant falls in (replicas tick at the same instants)."""
    return int(at.timestamp()) // 3


def test_health_command_follows_the_port_of_the_config(env: Env, pool: asyncpg.Pool) -> None:
    """`etlsvc health` is the image's HEALTHCHECK: it asks the port the service listens on
    ([server] port, here through ETLSVC_PORT), and says in one line why it fails."""
    env.write_config("")
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "serve", "--config", str(env.dir / "config.toml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url, "ETLSVC_PORT": str(port)})
    try:
        deadline = time.monotonic() + 30
        while (healthy := env.cli("health", ETLSVC_PORT=str(port))).returncode != 0 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.strip() == f"http://127.0.0.1:{port}/health: 200 ok"
        elsewhere = env.cli("health", ETLSVC_PORT=str(free_port()))
        assert elsewhere.returncode == 1
        assert len(elsewhere.stderr.strip().splitlines()) == 1
        assert "ConnectError" in elsewhere.stderr
        bad = env.cli("health", ETLSVC_PORT="eighty")
        assert bad.returncode == 2 and "server.port" in bad.stderr, bad.stderr
    finally:
        serve.terminate()
        assert serve.wait(60) == 0
