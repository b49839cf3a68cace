"""Bearer JWTs of an identity provider (``[auth.jwt]``): checked against its JWKS, mapped
to a tenant and scopes by claims.

PyJWT checks the signature (only with the configured algorithms: never ``none``, never an
HMAC made with a public key), the expiry, the issuer and the audience. The JWKS is read at
start, again every ``refresh_s``, and when a token names a key id the set lacks (a provider
that rotated its keys), at most once a second: a flood of made-up key ids costs one fetch a
second, not one per request. A JWKS that cannot be read keeps the keys last read.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import structlog

from etlsvc.config import JwtConfig
from etlsvc.contract import NAME_PATTERN
from etlsvc.errors import ConfigError
from etlsvc.runtime.keys import SCOPES, ApiKey

log = structlog.get_logger()

_TENANT = re.compile(NAME_PATTERN)
#: Fewest seconds between two reads of the JWKS for key ids it lacked.
REFETCH_S = 1.0


class TokenRefused(Exception):
    """Why a token was not accepted (for the audit log; the caller is told only 403)."""


def looks_like_jwt(given: str) -> bool:
    return given.count(".") == 2 and given.startswith("eyJ")


class JwtVerifier:
    def __init__(self, cfg: JwtConfig, base_dir: str) -> None:
        self.cfg = cfg
        url = cfg.jwks.startswith(("http://", "https://"))
        self._url = cfg.jwks if url else None
        self._file = None if url else (Path(base_dir) / cfg.jwks).resolve()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = -float("inf")
        self._fetching: asyncio.Lock | None = None

    async def load(self) -> None:
        """Read the JWKS; ConfigError if it cannot be read at start."""
        try:
            await self._fetch()
        except Exception as exc:
            raise ConfigError(f"auth.jwt.jwks {self.cfg.jwks!r} cannot be read: {exc}") \
                from exc

    async def _fetch(self) -> None:
        if self._fetching is None:
            self._fetching = asyncio.Lock()
        async with self._fetching:
            if self._url:
                async with httpx.AsyncClient(timeout=10) as client:
                    response = await client.get(self._url)
                    response.raise_for_status()
                    text = response.content
            else:
                assert self._file is not None
                text = await asyncio.to_thread(self._file.read_bytes)
            document = msgspec.json.decode(text)
            keys = {}
            for item in document.get("keys", []):
                with contextlib.suppress(jwt.PyJWKError, jwt.InvalidKeyError):
                    key = jwt.PyJWK.from_dict(item)
                    keys[key.key_id or ""] = key
            if not keys:
                raise ValueError("it holds no key this service can use")
            self._keys, self._fetched = keys, time.monotonic()

    async def run(self) -> None:
        """Read the JWKS every ``refresh_s``; until cancelled."""
        while True:
            await asyncio.sleep(self.cfg.refresh_s)
            try:
                await self._fetch()
            except Exception as exc:
                log.warning("cannot read the JWKS again; keeping the keys read before",
                            jwks=self.cfg.jwks, error=str(exc)[:200])

    async def _key(self, kid: str) -> jwt.PyJWK:
        key = self._keys.get(kid)
        if key is None and time.monotonic() - self._fetched >= REFETCH_S:
            with contextlib.suppress(Exception):
                await self._fetch()
            key = self._keys.get(kid)
        if key is None:
            raise TokenRefused(f"signed by a key the JWKS does not hold (kid {kid[:40]!r})")
        return key

    async def verify(self, token: str) -> ApiKey:
        """The grant of a valid token; TokenRefused saying why otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRefused(f"not a JWT: {exc}") from None
        key = await self._key(str(header.get("kid") or ""))
        cfg = self.cfg
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=list(cfg.algorithms), audience=cfg.audience,
                issuer=cfg.issuer, leeway=cfg.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            raise TokenRefused(f"{type(exc).__name__}: {exc}") from None
        tenant = claims.get(cfg.tenant_claim)
        if not isinstance(tenant, str) or not _TENANT.match(tenant):
            raise TokenRefused(f"claim {cfg.tenant_claim!r} does not name a tenant")
        given = claims.get(cfg.scope_claim, "")
        named = given.split() if isinstance(given, str) else given if isinstance(
            given, list) else []
        scopes = [s[len(cfg.scope_prefix):] for s in named
                  if isinstance(s, str) and s.startswith(cfg.scope_prefix)
                  and s[len(cfg.scope_prefix):] in SCOPES]
        if not scopes:
            raise TokenRefused(f"claim {cfg.scope_claim!r} grants none of "
                               f"{', '.join(cfg.scope_prefix + s for s in SCOPES)}")
        sources: tuple[str, ...] = ()
        if cfg.sources_claim is not None and cfg.sources_claim in claims:
            listed = claims[cfg.sources_claim]
            if not isinstance(listed, list) or not all(
                    isinstance(s, str) and s and "\n" not in s for s in listed):
                raise TokenRefused(f"claim {cfg.sources_claim!r} is not a list of globs")
            # An empty list grants no source: a glob no source name matches (names are
            # NAME_PATTERN), for no globs at all would mean every source.
            sources = tuple(listed) or ("!",)
        subject = str(claims["sub"])[:200]
        return ApiKey(f"jwt:{subject}", max(scopes, key=SCOPES.index), tenant=tenant,
                      sources=sources, actor=f"jwt:{subject}")
