"""Tenants isolated by PostgreSQL (issue #25, point 1): row-level security holds every read
of the API to the tenant of its key, whatever the handler's SQL says."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from litestar import Request, get
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app, create_litestar
from etlsvc.api.http import READ, read_pool
from tests.conftest import Env, csv_source, run_source

KEYS = ("acme-reader@acme:read:acme-r, acme-ops@acme:run:acme-w, acme-admin@acme:admin:acme-a, "
        "globex-reader@globex:read:globex-r, globex-ops@globex:admin:globex-a")


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


#: Every table a read can reach that holds a source's data (all have a source column).
TABLES = ["normalized_data", "raw_csv_data", "etl_runs", "etl_rejects", "etl_checkpoints",
          "data_history", "data_tombstones", "data_versions", "etl_sources"]


@get("/leaky", **READ)
async def leaky(request: Request) -> dict[str, list[str]]:
    """A handler with the bug we fear: it reads every table with no tenant filter at all."""
    pool = read_pool(request)
    return {t: sorted({r["source"] for r in await pool.fetch(f"SELECT source FROM {t}")})
            for t in TABLES}


@get("/leaky-unscoped")
async def leaky_unscoped(request: Request) -> dict[str, int]:
    """Worse: no key check either (the endpoint forgot its scope), so no tenant is set."""
    return {"rows": await read_pool(request).fetchval("SELECT count(*) FROM normalized_data")}


@pytest.fixture
async def two_tenants(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """acme's source a (one bad row: a reject) and globex's source g, both loaded twice
    (a change, a delete: versions and tombstones)."""
    monkeypatch.setenv("ETLSVC_API_KEYS", KEYS)
    fields = 'source_id = "id"\ntitle = "title"\namount = "amount"'
    (tmp_path / "a.csv").write_text("id,title,amount\n1,a1,1\n2,a2,2\n3,a3,oops\n")
    (tmp_path / "g.csv").write_text("id,title,amount\n1,g1,1\n2,g2,2\n")
    cfg = env.config(
        csv_source("a", tmp_path / "a.csv", fields=fields,
                   extra='tenant = "acme"\ndeletes = "detect"\nmax_error_rate = 0.5') +
        csv_source("g", tmp_path / "g.csv", fields=fields,
                   extra='tenant = "globex"\ndeletes = "detect"'),
        extra="[server]\npublic_read = false")
    for name in ("a", "g"):
        assert (await run_source(cfg, name))["status"] == "succeeded"
    (tmp_path / "a.csv").write_text("id,title,amount\n1,a1 changed,1\n")
    (tmp_path / "g.csv").write_text("id,title,amount\n1,g1 changed,1\n")
    for name in ("a", "g"):
        assert (await run_source(cfg, name))["status"] == "succeeded"
    return cfg


async def test_a_handler_reading_with_no_tenant_filter_sees_only_its_tenants_rows(
        two_tenants, pool: asyncpg.Pool) -> None:
    # Every table really holds both tenants' rows.
    for table in TABLES:
        if table != "etl_rejects":
            assert {r["source"] for r in await pool.fetch(
                f"SELECT DISTINCT source FROM {table}")} == {"a", "g"}, table
    app = create_litestar(two_tenants)
    app.register(leaky)
    app.register(leaky_unscoped)
    async with AsyncTestClient(app=app) as client:
        for secret, own in (("acme-r", "a"), ("acme-w", "a"), ("globex-r", "g"),
                            ("globex-a", "g")):
            r = await client.get("/leaky", headers=bearer(secret))
            assert r.status_code == 200, r.text
            seen = r.json()
            assert seen.pop("etl_rejects") == (["a"] if own == "a" else [])
            assert seen == {t: [own] for t in TABLES if t != "etl_rejects"}, secret
        # No tenant set: nothing at all, not everything.
        assert (await client.get("/leaky-unscoped")).json() == {"rows": 0}
        assert (await client.get("/leaky-unscoped",
                                 headers=bearer("acme-r"))).json() == {"rows": 0}


async def test_the_api_shows_each_tenant_its_own_and_nothing_of_the_other(
        two_tenants, pool: asyncpg.Pool) -> None:
    ids = {r["source"] + r["source_id"]: r["id"] for r in await pool.fetch(
        "SELECT id, source, source_id FROM normalized_data")}
    runs = {r["source"]: r["id"] for r in await pool.fetch(
        "SELECT source, max(id) AS id FROM etl_runs GROUP BY source")}
    async with AsyncTestClient(app=create_app(two_tenants)) as client:
        acme, globex = bearer("acme-r"), bearer("globex-r")
        page = (await client.get("/data", headers=acme)).json()
        assert [(r["source"], r["title"]) for r in page["data"]] == [("a", "a1 changed")]
        page = (await client.get("/data", headers=globex)).json()
        assert [(r["source"], r["title"]) for r in page["data"]] == [("g", "g1 changed")]
        # The other tenant's record, its history, its run: not there.
        for path in (f"/data/{ids['g1']}", f"/data/{ids['g1']}/history",
                     f"/etl/runs/{runs['g']}"):
            r = await client.get(path, headers=acme)
            assert r.status_code == 404, (path, r.text)
            assert "g1" not in r.text and '"g"' not in r.text
        assert (await client.get(f"/data/{ids['a1']}", headers=acme)).status_code == 200
        # A filter naming the other tenant's source finds nothing.
        assert (await client.get("/data", params={"source": "g"},
                                 headers=acme)).json()["data"] == []
        for path in ("/etl/runs", "/etl/rejects", "/data/changes?after=0&limit=100&wait=20"):
            body = (await client.get(path, headers=acme)).json()["data"]
            assert {c["source"] for c in body} == {"a"}, path
        stats = (await client.get("/stats", headers=globex)).json()["data"]
        assert list(stats["sources"]) == ["g"]
        health = (await client.get("/health", headers=acme)).json()["data"]
        assert list(health["sources"]) == ["a"]
        # A cursor of globex's is not one acme can use.
        cursor = (await client.get("/data", params={"limit": 1}, headers=globex)).json()[
            "metadata"]["pagination"]
        assert cursor["next_cursor"] is None
        two = (await client.get("/etl/runs", params={"limit": 1}, headers=globex)).json()
        theirs = two["metadata"]["pagination"]["next_cursor"]
        r = await client.get("/etl/runs", params={"limit": 1, "cursor": theirs}, headers=acme)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_cursor"
        # Runs of the other tenant's source cannot be started, nor named.
        r = await client.post("/etl/run", json={"sources": ["g"]}, headers=bearer("acme-w"))
        assert r.status_code == 404, r.text
        assert r.json()["error"]["message"] == (
            "unknown source 'g' (configured sources: a)")


async def test_the_api_role_cannot_bypass_row_level_security(two_tenants,
                                                             pool: asyncpg.Pool) -> None:
    role = await pool.fetchrow("SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles "
                               "WHERE rolname = 'etlsvc_api'")
    assert dict(role) == {"rolsuper": False, "rolbypassrls": False, "rolcanlogin": False}
    # Every table with a source column: security on, and the one policy, for that role.
    unguarded = await pool.fetch("""
        SELECT c.relname FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'source'
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
          AND NOT (c.relrowsecurity AND EXISTS (
              SELECT 1 FROM pg_policies p WHERE p.tablename = c.relname
                AND p.policyname = 'tenant_reads' AND p.roles = '{etlsvc_api}'))""")
    assert unguarded == []
    # The role owns nothing, and may write nowhere but add to the audit log.
    assert await pool.fetchval("SELECT count(*) FROM pg_class WHERE relowner = "
                               "'etlsvc_api'::regrole") == 0
    assert [tuple(r) for r in await pool.fetch("""
        SELECT table_name, privilege_type FROM information_schema.role_table_grants
        WHERE grantee = 'etlsvc_api' AND privilege_type <> 'SELECT'""")] == [
        ("etl_audit", "INSERT")]
    # Nor read the keys' hashes, nor the key to them.
    for table in ("etl_api_keys", "etl_secrets"):
        assert not await pool.fetchval(
            "SELECT has_table_privilege('etlsvc_api', $1, 'SELECT')", table)


async def test_the_policies_function_keeps_one_plan_whatever_the_read_pool_asks(
    pool: asyncpg.Pool
) -> None:
    """The read pool plans each statement for its own values (force_custom_plan). The
    function every policy calls must not follow it: its query would be planned again at
    every read, 175 µs of PostgreSQL's time a read instead of 21 (bench/RESULTS.md)."""
    config = await pool.fetchval(
        "SELECT proconfig FROM pg_proc WHERE oid = 'etlsvc_visible(boolean)'::regprocedure")
    assert "plan_cache_mode=force_generic_plan" in config
