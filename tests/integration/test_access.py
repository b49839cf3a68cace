"""Access control an auditor would accept (issue #25, points 2 and 3): keys made, rotated,
revoked and expiring at run time, held to their tenant and sources on every replica, and
an append-only audit log of what was done and refused."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app, create_litestar
from tests.conftest import Env, csv_source, run_source
from tests.integration.test_tenants import bearer, two_tenants  # noqa: F401 (fixture)


def titles(page: dict) -> list[tuple[str, str]]:
    return [(r["source"], r["title"]) for r in page["data"]]


async def test_keys_made_at_run_time_are_kept_hashed_and_obey_rotation_revocation_expiry(
        two_tenants, pool: asyncpg.Pool) -> None:  # noqa: F811
    app, replica = create_litestar(two_tenants), create_litestar(two_tenants)
    async with AsyncTestClient(app=app) as client, AsyncTestClient(app=replica) as other:
        admin = bearer("acme-a")
        made = await client.post("/admin/keys", json={"name": "dash", "scope": "read"},
                                 headers=admin)
        assert made.status_code == 201, made.text
        key = made.json()["data"]
        secret = key["secret"]
        assert secret.startswith("etlsvc_") and len(secret) >= 7 + 43     # 256 bits
        assert key["tenant"] == "acme" and key["status"] == "active"
        # Only a keyed hash is kept: the secret is nowhere in the table.
        stored = await pool.fetchval("SELECT string_agg(t::text, ',') FROM etl_api_keys t")
        assert secret not in stored and secret[7:] not in stored
        # It reads its tenant's rows, on this replica and on another.
        for c in (client, other):
            for _ in range(30):            # the other replica sees it within a second or two
                r = await c.get("/data", headers=bearer(secret))
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert titles(r.json()) == [("a", "a1 changed")]
        # Listed without its secret, with its last use.
        listed = (await client.get("/admin/keys", headers=admin)).json()["data"]
        assert [(k["name"], k["status"]) for k in listed] == [("dash", "active")]
        assert "secret" not in listed[0] and "digest" not in listed[0]
        assert listed[0]["last_used_at"] is not None
        # globex's admin neither sees it nor can touch it.
        assert (await client.get("/admin/keys", headers=bearer("globex-a"))).json()[
            "data"] == []
        for action in ("rotate", "revoke"):
            r = await client.post(f"/admin/keys/{key['id']}/{action}",
                                  headers=bearer("globex-a"))
            assert r.status_code == 404, r.text
        # A run key cannot manage keys.
        r = await client.post("/admin/keys", json={"name": "x"}, headers=bearer("acme-w"))
        assert r.status_code == 403
        # Rotation: both secrets work for the grace period, then only the new one.
        rotated = await client.post(f"/admin/keys/{key['id']}/rotate", json={"grace_s": 1.5},
                                    headers=admin)
        new = rotated.json()["data"]["secret"]
        assert new != secret
        for s in (secret, new):
            assert (await client.get("/data", headers=bearer(s))).status_code == 200
        await asyncio.sleep(1.6)
        assert (await client.get("/data", headers=bearer(secret))).status_code == 403
        assert (await client.get("/data", headers=bearer(new))).status_code == 200
        # Revocation: refused here at once, and by the other replica within seconds.
        assert (await other.get("/data", headers=bearer(new))).status_code == 200
        r = await client.post(f"/admin/keys/{key['id']}/revoke", headers=admin)
        assert r.json()["data"]["status"] == "revoked"
        assert (await client.get("/data", headers=bearer(new))).status_code == 403
        for _ in range(40):
            if (await other.get("/data", headers=bearer(new))).status_code == 403:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the other replica still accepts a key revoked 4 s ago")
        # Expiry.
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        brief = (await client.post("/admin/keys", json={
            "name": "brief", "expires_at": soon.isoformat()}, headers=admin)).json()["data"]
        assert (await client.get("/data", headers=bearer(brief["secret"]))).status_code == 200
        await asyncio.sleep(max(0.0, (soon - dt.datetime.now(dt.UTC)).total_seconds()) + 0.1)
        assert (await client.get("/data", headers=bearer(brief["secret"]))).status_code == 403
        # A key limited to sources reads only those, and cannot make keys.
        narrow = (await client.post("/admin/keys", json={
            "name": "narrow", "scope": "admin", "sources": ["zz*"]},
            headers=admin)).json()["data"]
        assert (await client.get("/data", headers=bearer(narrow["secret"]))).json()[
            "data"] == []
        r = await client.post("/admin/keys", json={"name": "y"},
                              headers=bearer(narrow["secret"]))
        assert r.status_code == 403
        # Bad requests say what is wrong.
        r = await client.post("/admin/keys", json={"name": "z", "scope": "root"},
                              headers=admin)
        assert r.status_code == 400 and "scope must be one of" in r.text
        r = await client.post("/admin/keys", json={"name": "dash2", "hidden_fields": ["id"]},
                              headers=admin)
        assert r.status_code == 400 and "cannot hide id" in r.text


async def test_the_keys_command_makes_lists_rotates_and_revokes(
        two_tenants, env: Env, pool: asyncpg.Pool) -> None:  # noqa: F811
    made = await asyncio.to_thread(env.cli, "keys", "create", "ci", "--tenant", "globex",
                                   "--scope", "run", "--source", "g*",
                                   "--expires-in-days", "30")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("etlsvc_") and "shown this once" in made.stderr
    key_id = await pool.fetchval("SELECT id FROM etl_api_keys WHERE name = 'ci'")
    listing = await asyncio.to_thread(env.cli, "keys", "list")
    assert listing.returncode == 0
    line = next(x for x in listing.stdout.splitlines() if " ci " in x)
    assert line.split()[:5] == [str(key_id), "globex", "ci", "run", "active"]
    assert secret not in listing.stdout
    async with AsyncTestClient(app=create_litestar(two_tenants)) as client:
        assert titles((await client.get("/data", headers=bearer(secret))).json()) == [
            ("g", "g1 changed")]
        rotated = await asyncio.to_thread(env.cli, "keys", "rotate", str(key_id),
                                          "--grace", "0")
        assert rotated.returncode == 0, rotated.stderr
        new = rotated.stdout.strip()
        for _ in range(40):
            if (await client.get("/data", headers=bearer(new))).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/data", headers=bearer(secret))).status_code == 403
        revoked = await asyncio.to_thread(env.cli, "keys", "revoke", str(key_id))
        assert revoked.returncode == 0, revoked.stderr
        for _ in range(40):
            r = await client.get("/data", headers=bearer(new))
            if r.status_code == 403:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 403
    missing = await asyncio.to_thread(env.cli, "keys", "revoke", "999999")
    assert missing.returncode == 1 and "no live key 999999" in missing.stderr
    actions = [tuple(r) for r in await pool.fetch(
        "SELECT action, outcome, tenant FROM etl_audit WHERE actor LIKE 'cli:%' ORDER BY id")]
    assert actions == [("key.create", "ok", "globex"), ("key.rotate", "ok", "globex"),
                       ("key.revoke", "ok", "globex"), ("key.revoke", "failed", None)]


async def test_the_audit_log_records_actions_and_refusals_and_cannot_be_rewritten(
        two_tenants, pool: asyncpg.Pool) -> None:  # noqa: F811
    async with AsyncTestClient(app=create_app(two_tenants)) as client:
        r = await client.post("/etl/run", json={"sources": ["a"]}, headers=bearer("acme-w"),
                              params={}, )
        assert r.status_code == 202, r.text
        started = r.json()["data"]
        r = await client.post("/etl/rejects/ignore", json={"source": "a"},
                              headers=bearer("acme-w"))
        assert r.status_code == 200
        await client.post("/etl/run", json={"sources": ["g"]}, headers=bearer("acme-w"))
        await client.post("/etl/run", headers=bearer("wrong-secret"))
        await client.post("/etl/run", headers={"X-Request-ID": "no-key-1"})
        await client.post("/etl/run", headers=bearer("acme-r"))
        await client.post("/admin/keys", json={"name": "k"}, headers=bearer("globex-a"))
        await client.get("/data", headers=bearer("wrong-secret"))       # public_read off
        page = (await client.get("/admin/audit", headers=bearer("acme-a"))).json()
        rows = page["data"]
        seen = [(e["action"], e["actor"], e["outcome"], e["status"]) for e in rows]
        assert seen == [
            ("runs.start", "key:acme-reader", "denied", 403),
            ("runs.start", "key:acme-ops", "failed", 404),
            ("rejects.ignore", "key:acme-ops", "ok", 200),
            ("runs.start", "key:acme-ops", "ok", 202),
        ], seen
        assert rows[3]["details"]["runs"] == [run["run_id"] for run in started["runs"]]
        assert rows[3]["target"] == "a" and rows[3]["client"] and rows[3]["request_id"]
        assert page["metadata"]["pagination"]["tenant"] == "acme"
        # globex's admin sees its own entry, not acme's.
        theirs = (await client.get("/admin/audit", headers=bearer("globex-a"))).json()["data"]
        assert [(e["action"], e["tenant"]) for e in theirs] == [("key.create", "globex")]
        # Refusals whose tenant cannot be told are the operator's (default tenant's).
        refused = await pool.fetch("SELECT actor, status, request_id, details FROM etl_audit "
                                   "WHERE tenant IS NULL ORDER BY id")
        assert [(r["actor"][:8], r["status"]) for r in refused] == [
            ("unknown:", 403), ("anonymou", 401), ("unknown:", 403)]
        assert refused[1]["request_id"] == "no-key-1"
        assert refused[2]["details"] == {"refused": "unknown key"}
        assert "wrong-secret" not in str([dict(r) for r in refused])
    # Append-only: the API's role may not change or remove a row; nobody may.
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("UPDATE etl_audit SET outcome = 'ok'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("DELETE FROM etl_audit")
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE etlsvc_api")
            await conn.execute("SELECT set_config('etlsvc.tenant', 'acme', true)")
            for statement in ("UPDATE etl_audit SET outcome = 'ok'", "DELETE FROM etl_audit",
                              "TRUNCATE etl_audit"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    async with conn.transaction():          # a savepoint
                        await conn.execute(statement)
            await conn.execute("INSERT INTO etl_audit (actor, action, outcome) "
                               "VALUES ('test', 'probe', 'ok')")


async def test_a_shared_dataset_is_read_only_with_its_fields_and_its_use_is_metered(
        two_tenants, pool: asyncpg.Pool) -> None:  # noqa: F811
    async with AsyncTestClient(app=create_app(two_tenants)) as client:
        acme, globex_admin = bearer("acme-r"), bearer("globex-a")
        assert [r["name"] for r in (await client.get("/catalog", headers=acme)).json()[
            "data"]] == ["a"]
        # acme cannot publish globex's dataset, nor to itself.
        r = await client.post("/admin/shares", json={"source": "g", "tenant": "acme"},
                              headers=bearer("acme-a"))
        assert r.status_code == 404
        r = await client.post("/admin/shares", json={"source": "g", "tenant": "globex"},
                              headers=globex_admin)
        assert r.status_code == 400
        r = await client.post("/admin/shares", json={"source": "g", "tenant": "acme",
                                                     "fields": ["title"]},
                              headers=globex_admin)
        assert r.status_code == 201, r.text
        page = (await client.get("/data", headers=acme)).json()["data"]
        assert [(x["source"], x["title"]) for x in page] == [("a", "a1 changed"),
                                                              ("g", "g1 changed")]
        theirs = next(x for x in page if x["source"] == "g")
        ours = next(x for x in page if x["source"] == "a")
        assert "amount" not in theirs and "description" not in theirs
        assert ours["amount"] == "1"
        one = (await client.get(f"/data/{theirs['id']}", headers=acme)).json()["data"]
        assert "amount" not in one and one["lineage"]["raw"] is None
        history = (await client.get(f"/data/{theirs['id']}/history", headers=acme)).json()
        assert {"amount"} & set(history["data"][0]["record"]) == set()
        # The feed serves what every transaction on the cluster has moved past: wait for it.
        feed = (await client.get("/data/changes", params={"limit": 100, "wait": 20},
                                 headers=acme)).json()["data"]
        for _ in range(60):
            if {c["source"] for c in feed} == {"a", "g"}:
                break
            await asyncio.sleep(0.5)
            feed = (await client.get("/data/changes", params={"limit": 100},
                                     headers=acme)).json()["data"]
        assert {c["source"] for c in feed} == {"a", "g"}
        assert all("amount" not in c["record"] for c in feed
                   if c["source"] == "g" and c["record"])
        # The catalog: both, the shared one marked, with only the fields it exposes.
        listed = {d["name"]: d for d in (await client.get("/catalog", headers=acme)).json()[
            "data"]}
        assert listed["g"]["shared"] is True and listed["g"]["owner"] == "globex"
        assert [f["name"] for f in listed["g"]["fields"]] == ["source_id", "title"]
        assert listed["a"]["shared"] is False
        assert [f["name"] for f in listed["a"]["fields"]] == ["source_id", "title", "amount"]
        assert listed["a"]["rows"] == 1 and listed["a"]["reject_rate_7d"] == 0.25
        assert listed["a"]["last_success"] and listed["a"]["sample"] == "/data?source=a&limit=10"
        # Read-only: no run, retry or rollback of it.
        for path, body in (("/etl/run", {"sources": ["g"]}),
                           ("/etl/rejects/retry", {"source": "g"}),
                           ("/etl/rollback", {"source": "g", "to_run": 1})):
            r = await client.post(path, json=body, headers=bearer("acme-a"))
            assert r.status_code == 404, (path, r.text)
        # The publisher sees who consumed it; the consumer is counted in /metrics too.
        usage = (await client.get("/admin/usage", headers=globex_admin)).json()["data"]
        acme_use = [u for u in usage if u["tenant"] == "acme" and u["source"] == "g"]
        assert len(acme_use) == 1 and acme_use[0]["key_name"] == "acme-reader"
        assert acme_use[0]["rows"] >= 3 and acme_use[0]["requests"] >= 3
        metrics = (await client.get("/metrics")).text
        assert 'etlsvc_served_rows_total{key="acme-reader",source="g",tenant="acme"}' in metrics
        # Withdrawn: gone from acme's reads (this replica at once).
        r = await client.delete("/admin/shares/g/acme", headers=globex_admin)
        assert r.status_code == 200, r.text
        assert {x["source"] for x in (await client.get("/data", headers=acme)).json()[
            "data"]} == {"a"}
        audit = [(e["action"], e["outcome"]) for e in (await client.get(
            "/admin/audit", headers=globex_admin)).json()["data"]]
        assert audit[:2] == [("share.delete", "ok"), ("share.create", "ok")]


async def test_a_key_sees_none_of_its_hidden_fields_and_config_shares_apply(
        env: Env, tmp_path, monkeypatch: pytest.MonkeyPatch, pool: asyncpg.Pool) -> None:
    monkeypatch.setenv("ETLSVC_API_KEYS", "acme-admin@acme:admin:acme-a")
    (tmp_path / "g.csv").write_text("id,title,description\n1,g1,secret words\n")
    cfg = env.config(csv_source(
        "g", tmp_path / "g.csv", fields='source_id = "id"\ntitle = "title"\n'
        'description = "description"',
        extra='tenant = "globex"\n[sources.share]\ntenants = ["acme"]\n'
              'fields = ["title", "description"]'), extra="[server]\npublic_read = false")
    assert (await run_source(cfg, "g"))["status"] == "succeeded"
    async with AsyncTestClient(app=create_app(cfg)) as client:
        admin = bearer("acme-a")
        assert [x["description"] for x in (await client.get("/data", headers=admin)).json()[
            "data"]] == ["secret words"]
        made = (await client.post("/admin/keys", json={
            "name": "nodesc", "hidden_fields": ["description"]}, headers=admin)).json()["data"]
        page = (await client.get("/data", headers=bearer(made["secret"]))).json()["data"]
        assert [x["title"] for x in page] == ["g1"] and "description" not in page[0]
        assert "secret words" not in (await client.get(
            f"/data/{page[0]['id']}", headers=bearer(made["secret"]))).text
        changes = (await client.get("/data/changes", params={"wait": 20},
                                    headers=bearer(made["secret"]))).text
        assert "g1" in changes and "secret words" not in changes
    assert [tuple(r) for r in await pool.fetch(
        "SELECT source, subscriber, origin FROM etl_shares")] == [("g", "acme", "config")]
