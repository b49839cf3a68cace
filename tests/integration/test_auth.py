"""API keys with scopes: read, run, admin; public reads or not; 401 and 403 as before."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app
from tests.conftest import Env, csv_source

KEYS = "grafana:read:r-secret, ci:run:w-secret, ops:admin:a-secret, legacy-secret"
READS = ["/data", "/etl/runs", "/etl/rejects", "/stats", "/etl/runs/1", "/data/1"]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def client(env: Env, tmp_path, monkeypatch: pytest.MonkeyPatch, request):
    monkeypatch.setenv("ETLSVC_API_KEYS", KEYS)
    (tmp_path / "a.csv").write_text("id\n1\n")
    public = getattr(request, "param", True)
    cfg = env.config(csv_source("a", tmp_path / "a.csv", fields='source_id = "id"'),
                     extra=f"[server]\npublic_read = {str(public).lower()}")
    async with AsyncTestClient(app=create_app(cfg)) as c:
        yield c


@pytest.mark.parametrize("client", [False], indirect=True)
async def test_with_public_read_off_reads_need_a_read_key(client) -> None:
    for path in READS:
        assert (await client.get(path)).status_code == 401, path
        assert (await client.get(path, headers=bearer("wrong"))).status_code == 403, path
        for secret in ("r-secret", "w-secret", "a-secret", "legacy-secret"):
            r = await client.get(path, headers=bearer(secret))
            assert r.status_code in (200, 404), (path, secret, r.text)
    # health and metrics stay open: load balancers and Prometheus have no key
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200


async def test_with_public_read_on_reads_need_no_key(client) -> None:
    for path in ("/data", "/etl/runs", "/etl/rejects", "/stats"):
        assert (await client.get(path)).status_code == 200, path


async def test_starting_runs_needs_the_run_scope(client) -> None:
    assert (await client.post("/etl/run")).status_code == 401
    refused = await client.post("/etl/run", headers=bearer("r-secret"))
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == "the API key 'grafana' lacks the 'run' scope"
    for secret in ("w-secret", "a-secret", "legacy-secret"):
        r = await client.post("/etl/run", headers=bearer(secret))
        assert r.status_code in (202, 409), (secret, r.text)


async def test_the_log_stream_needs_the_admin_scope(client) -> None:
    assert (await client.get("/logs/stream")).status_code == 401
    for secret in ("r-secret", "w-secret"):
        r = await client.get("/logs/stream", headers=bearer(secret))
        assert r.status_code == 403 and "lacks the 'admin' scope" in r.json()["error"]["message"]


def test_serve_with_a_malformed_key_list_exits_2_without_echoing_it(env: Env) -> None:
    env.write_config("")
    result = env.cli("serve", ETLSVC_API_KEYS="ops:superuser:hunter2", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "ETLSVC_API_KEYS entry 1 (ops)" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize("public", [False, True])
async def test_health_shows_details_only_to_whom_may_read(
        env: Env, tmp_path, monkeypatch: pytest.MonkeyPatch, public: bool) -> None:
    from tests.conftest import run_source

    monkeypatch.setenv("ETLSVC_API_KEYS", KEYS)
    cfg = env.config(csv_source("a", tmp_path / "missing.csv", fields='source_id = "id"'),
                     extra=f"[server]\npublic_read = {str(public).lower()}")
    await run_source(cfg, "a")                    # fails, naming the file's absolute path
    async with AsyncTestClient(app=create_app(cfg)) as c:
        anyone = (await c.get("/health")).json()["data"]
        reader = (await c.get("/health", headers=bearer("r-secret"))).json()["data"]
    assert anyone["failing_sources"] == reader["failing_sources"] == ["a"]
    assert str(tmp_path) in reader["sources"]["a"]["error"]
    if public:
        assert anyone == {**reader, "sources": anyone["sources"]}
        assert str(tmp_path) in anyone["sources"]["a"]["error"]
    else:
        assert anyone["sources"] == {"a": {"status": "failed", "stale": False,
                                           "failing": True, "degraded": False}}
        assert str(tmp_path) not in str(anyone)


async def test_the_openapi_document_says_which_operations_take_a_key(client) -> None:
    doc = (await client.get("/schema/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"][
            "securitySchemes"]["apiKey"]["description"]}
    run = doc["paths"]["/etl/run"]["post"]
    assert run["security"] == [{"apiKey": []}]
    assert run["requestBody"]["required"] is False           # the body is optional
    assert doc["paths"]["/data"]["get"]["security"] == [{}, {"apiKey": []}]
    assert "security" not in doc["paths"]["/health"]["get"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                for example in response.get("content", {}).get(
                        "application/json", {}).get("examples", {}).values():
                    if "error" in example["value"]:
                        # a real example of this very status, not generated filler
                        assert example["value"]["error"]["status"] == int(status), (
                            method, path, status)
