"""`etlsvc logs` on a captured stream, and GET /logs/stream (server-sent events)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncpg
import httpx
import pytest

from tests.conftest import Env, csv_source, log_events


@pytest.fixture
def captured(env: Env, gen_csv) -> str:
    """A real JSON log stream: two runs of two sources, one of them failing."""
    full, _ = gen_csv(2_000)
    env.write_config(csv_source("good", full) + csv_source("bad", env.dir / "missing.csv"))
    out = ""
    for name in ("good", "bad", "good"):
        out += env.cli("run", name).stdout
    return out


def etlsvc_logs(stream: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "etlsvc", "logs", *args],
        input=stream,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_logs_filters_by_run_id_and_level(captured: str) -> None:
    events = log_events(captured)
    runs = sorted({e["run_id"] for e in events if "run_id" in e})
    assert len(runs) == 3
    result = etlsvc_logs(captured, "--run-id", str(runs[1]))
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    expected = [e for e in events if e.get("run_id") == runs[1]]
    assert len(lines) == len(expected) > 0
    assert all(f"run_id={runs[1]}" in line for line in lines)
    assert all("\x1b[" not in line for line in lines)  # no colours off a terminal
    errors = etlsvc_logs(captured, "--level", "error").stdout.strip().splitlines()
    assert len(errors) == len([e for e in events if e["level"] == "error"]) >= 1
    assert all("[error" in line for line in errors)
    by_source = etlsvc_logs(captured, "--source", "good", "--level", "info").stdout
    assert "source=bad" not in by_source and "source=good" in by_source
    assert etlsvc_logs(captured, "--run-id", "999999").returncode == 1


def test_logs_reads_a_file(captured: str, tmp_path) -> None:
    path = tmp_path / "etl.log"
    path.write_text(captured + "not json at all\n")
    result = subprocess.run(
        [sys.executable, "-m", "etlsvc", "logs", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "run finished" in result.stdout and "not json at all" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "etlsvc", "logs", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "No such file" in missing.stderr


async def test_log_stream_sends_live_events_to_an_authorised_client(
    env: Env, pool: asyncpg.Pool, gen_csv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_service import servers

    monkeypatch.setenv("ETLSVC_API_KEYS", "k")
    full, _ = gen_csv(2_000)
    env.write_config(csv_source("products", full))
    with servers(env) as (server,):
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            assert (await client.get("/logs/stream")).status_code == 401
            events = []

            async def listen() -> None:
                async with client.stream(
                    "GET",
                    "/logs/stream",
                    params={"source": "products", "level": "info"},
                    headers={"Authorization": "Bearer k"},
                ) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            events.append(json.loads(line[5:]))
                            if events[-1]["event"] == "run finished":
                                return

            listener = asyncio.create_task(listen())
            await asyncio.sleep(0.5)
            r = await client.post("/etl/run", headers={"Authorization": "Bearer k"})
            assert r.status_code == 202
            await asyncio.wait_for(listener, 30)
    assert {e["event"] for e in events} >= {"run started", "run finished"}
    assert all(e["source"] == "products" for e in events)


@pytest.mark.parametrize("url", [
    "postgresql://etl:hunter2@127.0.0.1:9/none",
    "postgresql://etl@127.0.0.1:9/none?password=hunter2",
])
def test_no_command_prints_a_database_password(env: Env, gen_csv, url: str) -> None:
    full, _ = gen_csv(2_000)
    env.write_config(csv_source("good", full))
    for command in ("check", "run", "serve"):
        result = env.cli(command, ETLSVC_DATABASE_URL=url, timeout=60)
        assert result.returncode == 1, (command, result.stderr)
        assert "hunter2" not in result.stderr + result.stdout, command
        assert "127.0.0.1:9" in result.stderr + result.stdout, command


def test_logs_into_a_closed_pipe_exits_quietly(captured: str, tmp_path) -> None:
    log = tmp_path / "big.log"
    log.write_text(captured * 50)
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m etlsvc logs {log} | head -1"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and len(done.stdout.splitlines()) == 1
