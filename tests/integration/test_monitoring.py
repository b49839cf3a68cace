"""What ships for monitoring (`monitoring/`): the alerting rules pass their promtool unit
tests, and every metric the rules and the Grafana dashboard use is one `GET /metrics` of a
real `etlsvc serve` exposes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import asyncpg
import httpx
import pytest
import yaml

from tests.conftest import Env, csv_source
from tests.integration.test_service import KEY, api_keys, servers  # noqa: F401  (the autouse fixture)

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
PROMTOOL = shutil.which("promtool")


def used_metrics() -> dict[str, set[str]]:
    """The etlsvc metric names each shipped file's queries use."""
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = {"alerts.yml": [r["expr"] for g in rules["groups"] for r in g["rules"]]}
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs["grafana-dashboard.json"] = [t["expr"] for p in dashboard["panels"]
                                       for t in p["targets"]]
    return {name: {m for e in found for m in re.findall(r"\betlsvc_\w+", e)}
            for name, found in exprs.items()}


def exposed(text: str) -> set[str]:
    """Every sample name an exposition can carry: its samples, and for each declared metric
    the names of its samples (a labelled metric has none until a label set is used)."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    for name, kind in re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M):
        names |= {name} if kind != "histogram" else {
            f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


@pytest.mark.skipif(not PROMTOOL, reason="no promtool (apt-get install prometheus)")
def test_alert_rules_and_the_scrape_config_pass_promtool() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"],
                 ["check", "config", "prometheus.yml"]):
        result = subprocess.run([PROMTOOL, *args], cwd=MONITORING, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    # Each alert has a unit test that expects it to fire.
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts.test.yml").read_text()))
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} == tested


async def test_every_metric_the_rules_and_the_dashboard_use_is_exposed(
        env: Env, pool: asyncpg.Pool, gen_csv) -> None:
    path, _ = gen_csv(2_000)
    env.write_config(csv_source("products", path, extra='schedule = "1h"')
                     + csv_source("missing", path.parent / "absent.csv"))
    with servers(env) as (server,):
        for source in ("products", "missing"):
            httpx.post(f"{server.base}/etl/run", json={"sources": [source]}, headers=KEY)
        for _ in range(300):
            runs = httpx.get(f"{server.base}/etl/runs").json()["data"]
            if len(runs) == 2 and all(r["status"] != "running" for r in runs):
                break
            await asyncio.sleep(0.1)
        text = httpx.get(f"{server.base}/metrics").text
    names = exposed(text)
    for shipped, used in used_metrics().items():
        assert used, shipped
        assert used <= names, f"{shipped} uses metrics /metrics lacks: {sorted(used - names)}"
    # The gauges behind the stale-source and database alerts carry this scrape's values.
    assert 'etlsvc_source_stale{source="products"} 0.0' in text
    assert 'etlsvc_source_failing{source="missing"} 1.0' in text
    assert "etlsvc_database_up 1.0" in text
    assert re.search(r'etlsvc_source_last_success_timestamp_seconds\{source="products"\} \d', text)
    assert 'etlsvc_runs_total{source="missing",status="failed"} 1.0' in text
