"""The embedded PostgreSQL: started by etlsvc itself, never left running behind it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, csv_source, log_events


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "pg18" / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not a running server
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


def write_config(tmp_path: Path, csv: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        '[embedded]\ndata_dir = "data"\n[log]\nformat = "json"\n' + csv_source("products", csv)
    )
    return config


def etlsvc(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "etlsvc", *args, "--config", str(config)]


def no_db_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ETLSVC_DATABASE_URL"}


def test_run_on_the_embedded_server_loads_and_stops_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, REPO / "samples" / "products.csv")
    result = subprocess.run(
        etlsvc(config, "run"), capture_output=True, text=True, env=no_db_env(), timeout=180
    )
    assert result.returncode == 0, result.stderr + result.stdout
    summary = next(e for e in log_events(result.stdout) if e["event"] == "run finished")
    assert summary["rows_read"] == 1000 and summary["rows_inserted"] == 990
    data_dir = tmp_path / "data"
    assert (data_dir / "pg18" / "data" / "PG_VERSION").read_text().strip() == "18"
    assert postmaster_pid(data_dir) is None  # stopped cleanly: pid file removed
    # The data persists: a second run finds the checkpoint and reads nothing.
    again = subprocess.run(
        etlsvc(config, "run"), capture_output=True, text=True, env=no_db_env(), timeout=180
    )
    assert again.returncode == 0, again.stderr
    summary = next(e for e in log_events(again.stdout) if e["event"] == "run finished")
    assert (summary["rows_read"], summary["rows_inserted"]) == (0, 0)
    check = subprocess.run(
        etlsvc(config, "check"), capture_output=True, text=True, env=no_db_env(), timeout=180
    )
    assert check.returncode == 0 and "(embedded)" in check.stderr


def test_sigkill_of_etlsvc_never_leaves_postgres_running(tmp_path: Path, gen_csv) -> None:
    full, _ = gen_csv(200_000)
    config = write_config(tmp_path, full)
    proc = subprocess.Popen(
        etlsvc(config, "run"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=no_db_env(),
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the run is under way
        if '"reading file"' in line:
            break
    pid = postmaster_pid(tmp_path / "data")
    assert pid and alive(pid)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "postgres outlived the etlsvc process that started it"
