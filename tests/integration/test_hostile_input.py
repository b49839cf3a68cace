"""Hostile and careless requests get a 4xx that says what was wrong, never a 500."""

from __future__ import annotations

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app
from tests.conftest import Env, csv_source

KEY = {"Authorization": "Bearer test-key"}


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETLSVC_API_KEYS", "test-key")


@pytest.fixture
async def client(env: Env, tmp_path):
    (tmp_path / "a.csv").write_text("id\n1\n")
    cfg = env.config(csv_source("a", tmp_path / "a.csv", fields='source_id = "id"')
                     + csv_source("b", tmp_path / "a.csv", fields='source_id = "id"'),
                     extra="[server]\nrate_limit_per_minute = 0")
    async with AsyncTestClient(app=create_app(cfg)) as c:
        yield c


@pytest.mark.parametrize(("path", "param"), [
    ("/data", "category"), ("/data", "source"), ("/etl/runs", "source"),
    ("/etl/rejects", "source"), ("/data", "cursor")])
async def test_a_nul_in_a_filter_is_a_400(client, path: str, param: str) -> None:
    r = await client.get(path, params={param: "\x00"})
    assert r.status_code == 400, r.text
    assert "NUL" in r.json()["error"]["message"]


@pytest.mark.parametrize("param", ["event_from", "event_to", "updated_since"])
@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_date_times_at_the_edge_of_the_range_are_a_400(client, param, value) -> None:
    r = await client.get("/data", params={param: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"{param}: ")


async def test_date_times_inside_the_range_work(client) -> None:
    for value in ("0001-01-01T00:00:00-01:00", "9999-12-31T23:59:59+01:00",
                  "2026-01-01T00:00:00"):
        r = await client.get("/data", params={"event_from": value})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("key", [None, "Bearer wrong"])
@pytest.mark.parametrize("body", [b"\xff\xfe\xfa not utf-8", b"[" * 100_000,
                                  b'{"sources": ' + b"[" * 100_000])
async def test_the_key_is_checked_before_the_body_is_read(client, key, body) -> None:
    headers = {"Content-Type": "application/json", **({"Authorization": key} if key else {})}
    r = await client.post("/etl/run", content=body, headers=headers)
    assert r.status_code == (401 if key is None else 403), r.text


@pytest.mark.parametrize("body", [b"\xff\xfe\xfa not utf-8", b"[" * 100_000, b"{}}",
                                  b'{"sources": "a"}', b'{"sources": [], "x": 1}',
                                  b'{"sources": ["\xff"]}', b'{"sources": ["a\xc3("]}'])
async def test_a_bad_body_with_a_good_key_is_a_400(client, pool: asyncpg.Pool, body) -> None:
    r = await client.post("/etl/run", content=body,
                          headers={**KEY, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["status"] == 400
    assert await pool.fetchval("SELECT count(*) FROM etl_runs") == 0


@pytest.mark.parametrize("path", ["/etl/rejects/retry", "/etl/rejects/ignore"])
@pytest.mark.parametrize("body", [b'{"source": "\xff"}', b'{"source": "a", "ids": [1], '
                                  b'"x\xff": 1}', b"[" * 100_000,
                                  b'{"source": "a", "ids": "x"}'])
async def test_a_bad_rejects_body_is_a_400(client, pool: asyncpg.Pool, path, body) -> None:
    r = await client.post(path, content=body,
                          headers={**KEY, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["status"] == 400


async def test_an_empty_source_list_is_a_400_not_everything(client, pool: asyncpg.Pool) -> None:
    r = await client.post("/etl/run", json={"sources": []}, headers=KEY)
    assert r.status_code == 400, r.text
    assert await pool.fetchval("SELECT count(*) FROM etl_runs") == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])
async def test_a_body_that_is_not_json_is_a_415(client, content_type) -> None:
    headers = {**KEY, **({"Content-Type": content_type} if content_type else {})}
    r = await client.post("/etl/run", content=b'{"sources": ["a"]}', headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(("path", "accepted"), [
    ("/data", ["as_of", "category", "cursor", "event_from", "event_to", "kind", "limit",
               "source", "updated_since"]),
    ("/etl/runs", ["cursor", "limit", "source", "status"]),
    ("/etl/rejects", ["cursor", "limit", "run_id", "source", "status"]),
    ("/health", []),
])
async def test_an_unknown_query_parameter_is_a_400_listing_the_accepted_ones(
    client, path: str, accepted: list[str]
) -> None:
    r = await client.get(path, params={"limt": "5"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unknown_parameter" and error["accepted"] == accepted
    assert "'limt'" in error["message"]


async def test_a_busy_source_among_several_starts_none_and_the_409_lists_every_busy_one(
    client, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as holder:    # another process is running a and b
        running = {}
        for name in ("a", "b"):
            running[name] = await holder.fetchval(
                "INSERT INTO etl_runs (source, kind, trigger) VALUES ($1, 'csv', 'manual') "
                "RETURNING id", name)
            await holder.execute(
                "SELECT pg_advisory_lock(hashtextextended('etlsvc:source:' || $1, 0))", name)
        r = await client.post("/etl/run", json={"sources": ["a", "b"]}, headers=KEY)
        await holder.execute("SELECT pg_advisory_unlock_all()")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["running"] == [{"source": "a", "run_id": running["a"]},
                                            {"source": "b", "run_id": running["b"]}]
    assert await pool.fetchval("SELECT count(*) FROM etl_runs") == 2     # none started


async def test_one_busy_source_starts_none_of_the_others(client, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as holder:
        run_b = await holder.fetchval(
            "INSERT INTO etl_runs (source, kind, trigger) VALUES ('b', 'csv', 'manual') "
            "RETURNING id")
        await holder.execute("SELECT pg_advisory_lock(hashtextextended('etlsvc:source:b', 0))")
        r = await client.post("/etl/run", json={"sources": ["a", "b"]}, headers=KEY)
        await holder.execute("SELECT pg_advisory_unlock_all()")
    assert r.status_code == 409
    assert r.json()["error"]["running"] == [{"source": "b", "run_id": run_b}]
    assert await pool.fetchval("SELECT count(*) FROM etl_runs WHERE source = 'a'") == 0


BODIES = {
    "not UTF-8 in a string": b'{"sources": ["\xff"], "source": "\xff", "ids": [1]}',
    "not UTF-8": b"\xff\xfe\xfa",
    "oversized": b'{"sources": ["' + b"a" * (2 << 20) + b'"]}',
    "deep": b"[" * 100_000,
}


async def test_no_endpoint_answers_500_to_a_hostile_body(client) -> None:
    """Every operation of the OpenAPI document (the streams, which never end, aside), with a
    valid key, each hostile body, as JSON and as text."""
    schema = (await client.get("/schema/openapi.json")).json()
    tried = set()
    for path, operations in schema["paths"].items():
        if path.endswith(("/stream", "/log")):
            continue
        url = path.replace("{run_id}", "1")
        for method in operations:
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            for name, body in BODIES.items():
                for ctype in ("application/json", "text/plain"):
                    r = await client.request(method.upper(), url, content=body,
                                             headers={**KEY, "Content-Type": ctype})
                    assert r.status_code < 500, (method, path, name, ctype, r.text[:300])
                    tried.add((method, path))
    assert {("post", "/etl/run"), ("post", "/etl/rejects/retry"),
            ("post", "/etl/rejects/ignore"), ("get", "/data")} <= tried, tried
