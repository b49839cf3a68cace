"""Bearer JWTs of an identity provider (issue #25, point 2): checked against its JWKS
(served here over real HTTP on 127.0.0.1), keys rotated and followed, the issuer, audience
and expiry checked, tenant and scopes taken from claims, and every refusal a bare 403."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from litestar.testing import AsyncTestClient

from etlsvc.api.app import create_app
from tests.conftest import Env, csv_source, run_source


class Jwks:
    """A JWKS endpoint whose keys the test changes."""

    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def publish(self, *keys: tuple[str, object]) -> None:
        jwks = []
        for kid, private in keys:
            public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key())
                                if isinstance(private, rsa.RSAPrivateKey) else
                                jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
            jwks.append({**public, "kid": kid, "use": "sig"})
        self.body = json.dumps({"keys": jwks}).encode()


@pytest.fixture
def jwks() -> Iterator[Jwks]:
    endpoint = Jwks()
    thread = threading.Thread(target=endpoint.server.serve_forever, daemon=True)
    thread.start()
    yield endpoint
    endpoint.server.shutdown()


ISSUER, AUDIENCE = "https://idp.test", "etlsvc"


def jwt_config(jwks: Jwks, server: str = "", claims: str = "") -> str:
    """The config's ``[server]`` (reads need a key, and ``server``'s lines) and
    ``[auth.jwt]`` that trusts ``jwks`` for tokens of ISSUER to AUDIENCE, the tenant in
    their ``org`` claim (and ``claims``' lines)."""
    return (f'[server]\npublic_read = false\n{server}[auth.jwt]\njwks = "{jwks.url}"\n'
            f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\ntenant_claim = "org"\n{claims}')


def token(private: object, kid: str, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 300, "iat": now,
            "org": "acme", "scope": "openid etlsvc:read", **claims}
    alg = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(body, private, algorithm=alg, headers={"kid": kid})


@pytest.fixture
async def service(env: Env, tmp_path: Path, jwks: Jwks, pool: asyncpg.Pool):
    (tmp_path / "a.csv").write_text("id,title\n1,a1\n")
    (tmp_path / "g.csv").write_text("id,title\n1,g1\n")
    fields = 'source_id = "id"\ntitle = "title"'
    cfg = env.config(
        csv_source("a", tmp_path / "a.csv", fields=fields, extra='tenant = "acme"') +
        csv_source("g", tmp_path / "g.csv", fields=fields, extra='tenant = "globex"'),
        extra=jwt_config(jwks, claims='sources_claim = "datasets"\n'))
    for name in ("a", "g"):
        assert (await run_source(cfg, name))["status"] == "succeeded"
    return cfg


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def test_tokens_of_the_identity_provider_are_checked_and_mapped(
        service, jwks: Jwks, pool: asyncpg.Pool) -> None:
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = ec.generate_private_key(ec.SECP256R1())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.publish(("k1", k1))
    async with AsyncTestClient(app=create_app(service)) as client:
        good = token(k1, "k1")
        page = (await client.get("/data", headers=bearer(good))).json()
        assert [(r["source"], r["title"]) for r in page["data"]] == [("a", "a1")]
        # Its tenant is the claim's; its scope the highest etlsvc: one; read only here.
        r = await client.post("/etl/run", headers=bearer(good))
        assert r.status_code == 403 and "lacks the 'run' scope" in r.text
        runner = token(k1, "k1", scope=["etlsvc:read", "etlsvc:run"], org="globex")
        r = await client.post("/etl/run", headers=bearer(runner))
        assert r.status_code == 202, r.text
        assert [x["source"] for x in r.json()["data"]["runs"]] == ["g"]
        # Limited to the sources its claim lists (none: nothing).
        for datasets, seen in ((["a*"], ["a"]), (["zz"], []), ([], [])):
            limited = token(k1, "k1", datasets=datasets)
            assert [x["source"] for x in (await client.get(
                "/data", headers=bearer(limited))).json()["data"]] == seen, datasets
        # Every refusal is a bare 403.
        now = int(time.time())
        refused = {
            "expired": token(k1, "k1", exp=now - 3600),
            "other issuer": token(k1, "k1", iss="https://evil.test"),
            "other audience": token(k1, "k1", aud="someone-else"),
            "no tenant": token(k1, "k1", org=None),
            "bad tenant": token(k1, "k1", org="a b"),
            "no etlsvc scope": token(k1, "k1", scope="openid profile"),
            "unknown signer, known kid": token(stranger, "k1"),
            "unknown kid": token(stranger, "k9"),
            "tampered": _tampered(good),
            "alg none": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x",
                                    "exp": now + 60, "org": "acme",
                                    "scope": "etlsvc:admin"}, None, algorithm="none",
                                   headers={"kid": "k1"}),
            "hmac with the public key": _hmac_confusion(k1),
        }
        for why, value in refused.items():
            r = await client.get("/data", headers=bearer(value))
            assert r.status_code == 403, why
            assert r.json()["error"]["message"] == "this API key is not accepted", why
        # Rotation: the provider signs with k2 and drops k1; the service follows.
        jwks.publish(("k2", k2))
        await asyncio.sleep(1.1)             # a refetch for a new key id, once a second
        rotated = token(k2, "k2")
        r = await client.get("/data", headers=bearer(rotated))
        assert r.status_code == 200, r.text
        assert (await client.get("/data", headers=bearer(good))).status_code == 403
    denied = await pool.fetch("SELECT details ->> 'refused' AS why FROM etl_audit "
                              "WHERE outcome = 'denied' ORDER BY id")
    reasons = [d["why"] for d in denied]
    assert any("ExpiredSignatureError" in r for r in reasons)
    assert any("InvalidIssuerError" in r for r in reasons)
    assert any("does not hold (kid 'k9')" in r for r in reasons)


def _tampered(value: str) -> str:
    head, body, sig = value.split(".")
    claims = json.loads(jwt.utils.base64url_decode(body))
    claims["org"] = "globex"
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{head}.{forged}.{sig}"


def _hmac_confusion(private: rsa.RSAPrivateKey) -> str:
    """The classic attack: an HS256 token whose secret is the RSA public key (PEM)."""
    from cryptography.hazmat.primitives import serialization
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    header = jwt.utils.base64url_encode(json.dumps(
        {"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = jwt.utils.base64url_encode(json.dumps({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60,
        "org": "acme", "scope": "etlsvc:admin"}).encode())
    import hashlib
    import hmac
    sig = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
    return (header + b"." + body + b"." + jwt.utils.base64url_encode(sig)).decode()


async def test_a_jwks_that_cannot_be_read_at_start_is_a_clear_error(
        env: Env, tmp_path: Path) -> None:
    env.write_config("", extra=f"""[auth.jwt]
jwks = "missing.json"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
""")
    ran = await asyncio.to_thread(env.cli, "serve", "--port", "0", timeout=120)
    assert ran.returncode != 0
    assert "auth.jwt.jwks 'missing.json' cannot be read" in ran.stderr, ran.stderr[-2000:]
    assert "No such file" in ran.stderr
