"""The newcomer's path: samples/quickstart.py loads every sample, and its ``serve`` keeps the
samples' upstream up so that a run of the API and feed sources works under ``serve``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import asyncpg
import httpx
import pytest

from tests.conftest import REPO, Env
from tests.integration.test_service import Server, free_port

KEY = {"Authorization": "Bearer demo"}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_quickstart_serve_runs_every_sample_source_and_stops_on_sigterm(
        env: Env, pool: asyncpg.Pool) -> None:
    if not port_free(8765):
        pytest.skip("127.0.0.1:8765, the samples' port, is taken")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "samples" / "quickstart.py"), "serve", "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url, "ETLSVC_API_KEYS": "demo"})
    base = f"http://127.0.0.1:{port}"
    try:
        Server(proc, port).wait_up()
        deadline = time.monotonic() + 30
        started = httpx.post(f"{base}/etl/run", json={"sources": ["orders", "news"]},
                             headers=KEY, timeout=10)
        assert started.status_code == 202, started.text
        while await pool.fetchval("SELECT count(*) FROM etl_runs WHERE status = 'running'") \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        runs = {r["source"]: (r["status"], r["rows_inserted"]) for r in await pool.fetch(
            "SELECT source, status, rows_inserted FROM etl_runs")}
        assert runs == {"orders": ("succeeded", 59), "news": ("succeeded", 40)}, runs
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    assert port_free(8765)                  # the samples' upstream is gone with it
