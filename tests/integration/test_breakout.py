"""Tests that try to break out (issue #25, point 6). Two tenants, acme and globex, and a
third, initech, that subscribes to one of globex's datasets with only its titles. Each
caller tries the others' ids, cursors, change tokens, SSE resumes, rejects, runs, lineage
links, backfills, keys and shares; revoked, expired and forged credentials are tried too.
Every answer must be a refusal (403/404, or 400 for a cursor or token made for someone
else) or an empty answer no different from the one for something that does not exist, and
no answer may carry a byte of another tenant's data."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app
from tests.conftest import Env, csv_source, run_source
from tests.integration.test_tokens import Jwks, jwks, jwt_config, token  # noqa: F401

KEYS = ("acme-admin@acme:admin:acme-a, globex-admin@globex:admin:globex-a, "
        "initech-reader@initech:read:initech-r")
#: What each tenant's rows hold that nobody else may ever see: globex's amounts are not
#: even initech's, which is shared only globex's titles. (The amounts' marker has its
#: decimal point: without it, 1 random request id in 50,000 holds it.)
ACME, GLOBEX, GLOBEX_AMOUNT = "ACMESECRET", "GLOBEXSECRET", "31337."


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class Attempts:
    """Each attempt: the answer is one of ``allowed`` and carries none of ``hidden``."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.count = 0

    async def __call__(self, method: str, path: str, key: str, allowed: set[int],
                       hidden: tuple[str, ...], **kwargs: Any) -> Any:
        r = await self.client.request(method, path, headers={**bearer(key), **kwargs.pop(
            "headers", {})}, **kwargs)
        self.count += 1
        assert r.status_code in allowed, (method, path, key, r.status_code, r.text[:500])
        for marker in hidden:
            assert marker not in r.text, (method, path, key, marker, r.text[:500])
        return r


@pytest.fixture
async def world(env: Env, tmp_path: Path, jwks: Jwks, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.setenv("ETLSVC_API_KEYS", KEYS)
    fields = 'source_id = "id"\ntitle = "title"\namount = "amount"'
    a = "".join(f"{i},{ACME}-{i},{i}\n" for i in range(1, 13)) + "13,bad,oops\n"
    g = "".join(f"{i},{GLOBEX}-{i},{GLOBEX_AMOUNT}{i}\n" for i in range(1, 13)) + "13,x,no\n"
    (tmp_path / "a.csv").write_text("id,title,amount\n" + a)
    (tmp_path / "g.csv").write_text("id,title,amount\n" + g)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.publish(("k1", private))
    cfg = env.config(
        csv_source("a", tmp_path / "a.csv", fields=fields,
                   extra='tenant = "acme"\ndeletes = "detect"\nmax_error_rate = 0.5') +
        csv_source("g", tmp_path / "g.csv", fields=fields,
                   extra='tenant = "globex"\ndeletes = "detect"\nmax_error_rate = 0.5\n'
                         '[sources.share]\ntenants = ["initech"]\nfields = ["title"]'),
        extra=jwt_config(jwks, server="rate_limit_per_minute = 0\n"))
    for name in ("a", "g"):
        assert (await run_source(cfg, name))["status"] == "succeeded"
    # A second load: changed and deleted rows (versions, tombstones).
    (tmp_path / "a.csv").write_text("id,title,amount\n" + a.replace(f"{ACME}-1,", f"{ACME}-1b,")
                                    .replace(f"12,{ACME}-12,12\n", ""))
    (tmp_path / "g.csv").write_text("id,title,amount\n" + g.replace(f"{GLOBEX}-1,",
                                    f"{GLOBEX}-1b,").replace(f"12,{GLOBEX}-12,", "12,gone,"))
    for name in ("a", "g"):
        assert (await run_source(cfg, name))["status"] == "succeeded"
    return cfg, private


async def test_no_caller_gets_anything_of_another_tenant(world, pool: asyncpg.Pool) -> None:
    cfg, private = world
    ids = {s: [r["id"] for r in await pool.fetch(
        "SELECT id FROM data_history WHERE source = $1 UNION "
        "SELECT id FROM normalized_data WHERE source = $1 ORDER BY 1", s)] for s in "ag"}
    runs = {s: [r["id"] for r in await pool.fetch(
        "SELECT id FROM etl_runs WHERE source = $1", s)] for s in "ag"}
    rejects = {s: [r["id"] for r in await pool.fetch(
        "SELECT id FROM etl_rejects WHERE source = $1", s)] for s in "ag"}
    assert all(len(ids[s]) >= 12 and runs[s] and rejects[s] for s in "ag")
    async with AsyncTestClient(app=create_app(cfg)) as client:
        attempt = Attempts(client)
        # What each tenant's own reads give out: cursors, tokens, a backfill, a key.
        own: dict[str, dict[str, str]] = {}
        for tenant, key in (("acme", "acme-a"), ("globex", "globex-a"),
                            ("initech", "initech-r")):
            got = own[tenant] = {}
            got["data_cursor"] = (await client.get("/data", params={"limit": 1},
                                                   headers=bearer(key))).json()[
                "metadata"]["pagination"]["next_cursor"]
            page = (await client.get("/data/changes", params={"limit": 2},
                                     headers=bearer(key))).json()
            got["token"] = page["metadata"]["pagination"]["next"]
            got["change_token"] = page["data"][0]["token"]
            runs_page = (await client.get("/etl/runs", params={"limit": 1},
                                          headers=bearer(key))).json()
            got["runs_cursor"] = runs_page["metadata"]["pagination"]["next_cursor"]
        made = {}
        for tenant, key in (("acme", "acme-a"), ("globex", "globex-a")):
            r = await client.post("/admin/keys", json={"name": "probe"}, headers=bearer(key))
            made[tenant] = r.json()["data"]
        backfill = (await client.post("/etl/backfill", json={"source": "a"},
                                      headers=bearer("acme-a")))
        assert backfill.status_code in (202, 409, 422), backfill.text
        backfill_id = await pool.fetchval("SELECT max(id) FROM etl_backfills")

        callers = {"acme": ("acme-a", ("a", "globex"), (GLOBEX, GLOBEX_AMOUNT)),
                   "globex": ("globex-a", ("g", "acme"), (ACME,)),
                   "initech": ("initech-r", (), (ACME, GLOBEX_AMOUNT))}
        for tenant, (key, _, hidden) in callers.items():
            foreign_sources = [s for s in "ag" if not (
                (tenant == "acme" and s == "a") or (tenant == "globex" and s == "g"))]
            readable_ids = {"acme": ids["a"], "globex": ids["g"], "initech": ids["g"]}[tenant]
            for s in foreign_sources:
                shared = tenant == "initech" and s == "g"
                for i in ids[s]:
                    if shared:
                        continue
                    for path in (f"/data/{i}", f"/data/{i}/history",
                                 f"/data/{i}?as_of=2020-01-01T00:00:00Z"):
                        r = await attempt("GET", path, key, {404, 410, 422}, hidden)
                        assert str(i) in r.json()["error"]["message"] or r.status_code != 404
                for run in runs[s]:
                    await attempt("GET", f"/etl/runs/{run}", key, {404}, hidden)
                    await attempt("GET", f"/etl/runs/{run}/log", key, {404}, hidden)
                # Filters naming another tenant's source: the answer of a source that
                # does not exist.
                for path in (f"/data?source={s}", f"/etl/runs?source={s}",
                             f"/etl/rejects?source={s}", f"/etl/backfill?source={s}"):
                    r = await attempt("GET", path, key, {200}, hidden)
                    nothing = await client.get(path.replace(f"={s}", "=nosuchsource"),
                                               headers=bearer(key))
                    if not shared or "/data" not in path:
                        assert r.json()["data"] == nothing.json()["data"] == [], path
                for kind in ("csv",):
                    r = await attempt("GET", f"/data?kind={kind}", key, {200}, hidden)
                # Writes to it: not found, as a source that does not exist.
                for path, body in (("/etl/run", {"sources": [s]}),
                                   ("/etl/rejects/retry", {"source": s}),
                                   ("/etl/rejects/ignore", {"source": s}),
                                   ("/etl/rollback", {"source": s, "to_run": runs[s][0]}),
                                   ("/etl/backfill", {"source": s}),
                                   ("/admin/shares", {"source": s, "tenant": tenant})):
                    await attempt("POST", path, key, {403, 404}, hidden, json=body)
            # Its own readable ids with another's rejects, runs, backfill, keys.
            for s in foreign_sources:
                own_source = {"acme": "a", "globex": "g"}.get(tenant)
                if own_source:
                    for path in ("/etl/rejects/ignore", "/etl/rejects/retry"):
                        r = await attempt("POST", path, key, {200, 409}, hidden, json={
                            "source": own_source, "ids": rejects[s]})
                    await attempt("POST", "/etl/rollback", key, {404, 409, 422}, hidden,
                                  json={"source": own_source, "to_run": runs[s][-1]})
            if tenant != "acme":
                await attempt("GET", f"/etl/backfill/{backfill_id}", key, {404}, hidden)
                await attempt("POST", f"/etl/backfill/{backfill_id}/cancel", key,
                              {403, 404}, hidden)
            for other, key_made in made.items():
                if other == tenant:
                    continue
                for action in ("rotate", "revoke"):
                    await attempt("POST", f"/admin/keys/{key_made['id']}/{action}", key,
                                  {403, 404}, hidden)
            await attempt("DELETE", "/admin/shares/g/initech", key,
                          {403, 404} if tenant != "globex" else {200, 404}, hidden) \
                if tenant != "globex" else None
            # Cursors and tokens of the others.
            for other, got in own.items():
                if other == tenant:
                    continue
                for path, param, value in (("/data", "cursor", got["data_cursor"]),
                                           ("/etl/runs", "cursor", got["runs_cursor"]),
                                           ("/data/changes", "after", got["token"]),
                                           ("/data/changes", "after", got["change_token"]),
                                           ("/data", "as_of", got["token"])):
                    if value is None:
                        continue
                    r = await attempt("GET", path, key, {400}, hidden,
                                      params={param: value, "limit": 5})
                r = await attempt("GET", "/data/changes/stream", key, {400}, hidden,
                                  headers={"Last-Event-ID": got["change_token"]})
            # Everything it may list: nothing of the others.
            for path in ("/data?limit=1000", "/data/changes?limit=1000",
                         "/data/changes?limit=1000&versions=all", "/etl/runs?limit=1000",
                         "/etl/rejects?limit=1000", "/etl/backfill", "/catalog", "/stats",
                         "/health", "/me", "/admin/audit", "/admin/keys", "/admin/usage",
                         "/admin/shares"):
                r = await attempt("GET", path, key, {200, 403, 503}, hidden)
            for i in readable_ids[:3]:
                await attempt("GET", f"/data/{i}", key, {200, 404}, hidden)
                await attempt("GET", f"/data/{i}/history", key, {200, 404}, hidden)

        # Keys that no longer work, and forged credentials: 403, and nothing else.
        await client.post(f"/admin/keys/{made['acme']['id']}/revoke", headers=bearer("acme-a"))
        expired = (await client.post("/admin/keys", json={
            "name": "brief", "expires_at": "2020-01-01T00:00:00Z"},
            headers=bearer("acme-a"))).json()["data"]
        now = int(time.time())
        forged = [made["acme"]["secret"], expired["secret"], "etlsvc_" + "A" * 43,
                  "acme-aa", "ACME-A", made["acme"]["secret"][:-1],
                  token(private, "k1", org="acme", exp=now - 600),
                  token(private, "k1", org="acme", aud="other"),
                  token(private, "k1", org="acme", iss="https://evil.test"),
                  token(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                        "k1", org="acme"),
                  token(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                        "unknown-kid", org="acme"),
                  re.sub(r"\.[^.]+$", ".AAAA", token(private, "k1", org="acme"))]
        for credential in forged:
            for path in ("/data", "/data/changes", "/catalog", f"/data/{ids['a'][0]}",
                         "/admin/audit"):
                r = await attempt("GET", path, credential, {403}, (ACME, GLOBEX))
                assert r.json()["error"]["message"] == "this API key is not accepted"
        # A valid token of acme reads acme: the forged ones failed for what they are.
        good = token(private, "k1", org="acme")
        assert {r["source"] for r in (await client.get(
            "/data", headers=bearer(good))).json()["data"]} == {"a"}

        # initech reads globex's titles, never its amounts, anywhere.
        r = await attempt("GET", "/data?source=g&limit=100", "initech-r", {200},
                          (ACME, GLOBEX_AMOUNT))
        assert len(r.json()["data"]) == 12 and all(
            "amount" not in x for x in r.json()["data"])
        assert attempt.count >= 200, attempt.count
    # Nothing of another tenant was changed by all that: its rejects are still open, its
    # backfill not cancelled.
    for s in "ag":
        assert await pool.fetchval("SELECT count(*) FROM etl_rejects WHERE id = ANY ($1) "
                                   "AND status = 'open'", rejects[s]) == len(rejects[s])
    assert await pool.fetchval("SELECT status FROM etl_backfills WHERE id = $1",
                               backfill_id) != "cancelled"
