"""API keys: the grant a key carries, keys made at run time (``etlsvc keys``,
``/admin/keys``), and the cache every replica checks bearer keys against (with the shares,
which say what fields of a shared dataset its subscribers see).

A key made at run time is 256 random bits, shown once and kept only as a keyed hash
(HMAC-SHA256) in ``etl_api_keys`` (``sql/migrations/0019_keys_audit_usage.sql``). A slow
password hash (bcrypt, argon2) is for secrets people choose, which can be guessed; nobody
guesses 256 random bits, and such a hash would cost every request milliseconds. The hash is
keyed by ``ETLSVC_KEY_HASH_SECRET`` when set (then a copy of the table alone cannot be
checked against candidate keys), else by a secret kept in the database.

Each replica keeps every live key in memory (:class:`KeyStore`) and looks each second at a
counter that every change to a key bumps: a key revoked on one replica is refused by all
within about a second, without a query per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from etlsvc import db
from etlsvc.contract import DEFAULT_TENANT, RECORD_FIELDS
from etlsvc.errors import AccessError, ConfigError

log = structlog.get_logger()

SCOPES = ("read", "run", "admin")
#: What every key made here begins with (tells it from a JWT and from ETLSVC_API_KEYS).
PREFIX = "etlsvc_"
#: Fields a grant can hide from a key (the record fields of GET /data).
HIDEABLE = RECORD_FIELDS


@dataclass(frozen=True)
class ApiKey:
    """What a key grants: its name (for logs and the audit), the highest scope, its tenant,
    the sources it is limited to (globs; none: every source its tenant reads), the fields
    hidden from it. ``key_id`` is its row in etl_api_keys (None: from ETLSVC_API_KEYS or a
    JWT); ``secret`` only for ETLSVC_API_KEYS."""

    name: str
    scope: str
    secret: bytes = b""
    tenant: str = DEFAULT_TENANT
    sources: tuple[str, ...] = ()
    hidden: frozenset[str] = frozenset()
    key_id: int | None = None
    expires_at: dt.datetime | None = None
    #: Who this is in the audit log: key:NAME (ETLSVC_API_KEYS), key:NAME#ID (made at run
    #: time), jwt:SUBJECT.
    actor: str = ""

    def grants(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)

    @property
    def who(self) -> str:
        return self.actor or f"key:{self.name}"

    @property
    def read_scope(self) -> db.ReadScope:
        return db.ReadScope(self.tenant, tuple(map(like_pattern, self.sources)))


def like_pattern(glob: str) -> str:
    """The SQL LIKE pattern of a source glob (``*`` any run of characters, ``?`` one)."""
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


async def hash_key(pool: Any) -> bytes:
    """The key of the keys' hash: ``ETLSVC_KEY_HASH_SECRET``, else this database's own
    (made on first use, by whichever replica comes first)."""
    if given := os.environ.get("ETLSVC_KEY_HASH_SECRET"):
        if len(given) < 32:
            raise ConfigError("ETLSVC_KEY_HASH_SECRET must be at least 32 characters")
        return given.encode()
    await pool.execute(db.query("keys", "make_hash_key"), secrets.token_bytes(32))
    return await pool.fetchval(db.query("keys", "hash_key"))


def digest(key: bytes, secret: str) -> bytes:
    return hmac.new(key, secret.encode(), hashlib.sha256).digest()


def check_grant(scope: str, sources: list[str], hidden: list[str]) -> None:
    if scope not in SCOPES:
        raise AccessError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if unknown := sorted(set(hidden) - set(HIDEABLE)):
        raise AccessError(f"cannot hide {', '.join(unknown)}: hideable fields are "
                        f"{', '.join(HIDEABLE)}")
    if any(not s or "\n" in s for s in sources):
        raise AccessError("a source glob must be a non-empty line")


async def create(pool: Any, *, tenant: str, name: str, scope: str, sources: list[str],
                 hidden: list[str], expires_at: dt.datetime | None,
                 actor: str) -> tuple[asyncpg.Record, str]:
    """A new key: its row and its secret (shown this once)."""
    check_grant(scope, sources, hidden)
    secret = new_secret()
    try:
        row = await pool.fetchrow(db.query("keys", "create"), tenant, name, scope, sources,
                                  hidden, digest(await hash_key(pool), secret), expires_at,
                                  actor)
    except asyncpg.UniqueViolationError:
        raise AccessError(f"tenant {tenant!r} has a live key named {name!r} already") from None
    return row, secret


async def listing(pool: Any, tenant: str | None) -> list[asyncpg.Record]:
    return await pool.fetch(db.query("keys", "list"), tenant)


async def rotate(pool: Any, key_id: int, tenant: str | None,
                 grace_s: float) -> tuple[asyncpg.Record, str]:
    """A new secret for a live key; the old one stays valid ``grace_s`` seconds more."""
    secret = new_secret()
    row = await pool.fetchrow(db.query("keys", "rotate"), key_id, tenant,
                              digest(await hash_key(pool), secret), grace_s)
    if row is None:
        raise AccessError(f"no live key {key_id}", "not_found")
    return row, secret


async def revoke(pool: Any, key_id: int, tenant: str | None) -> asyncpg.Record:
    row = await pool.fetchrow(db.query("keys", "revoke"), key_id, tenant)
    if row is None:
        raise AccessError(f"no live key {key_id}", "not_found")
    return row


def view(row: asyncpg.Record) -> dict[str, Any]:
    """A key as the API and the CLI show it (never its hash)."""
    now = dt.datetime.now(dt.UTC)
    status = ("revoked" if row["revoked_at"] else
              "expired" if row["expires_at"] and row["expires_at"] <= now else "active")
    return {"id": row["id"], "tenant": row["tenant"], "name": row["name"],
            "scope": row["scope"], "sources": list(row["sources"]),
            "hidden_fields": list(row["hidden_fields"]), "status": status,
            "expires_at": row["expires_at"], "created_at": row["created_at"],
            "created_by": row["created_by"], "rotated_at": row["rotated_at"],
            "previous_valid_until": row["previous_until"], "revoked_at": row["revoked_at"],
            "last_used_at": row["last_used_at"]}


@dataclass
class _Entry:
    key: ApiKey
    until: float | None = None      # a rotated-out secret: valid until (time.time())


@dataclass
class KeyStore:
    """The live keys of etl_api_keys, by digest, reloaded when they change."""

    pool: Any
    #: Seconds between looks at the change counter.
    poll_s: float = 1.0
    #: Seconds between writes of last-used times.
    flush_s: float = 10.0
    _hash_key: bytes = b""
    _by_digest: dict[bytes, _Entry] = field(default_factory=dict)
    _generation: int = -1
    _used: dict[int, float] = field(default_factory=dict)
    #: Per subscriber tenant: the datasets shared with it, and the fields each one hides.
    _shared: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)

    async def load(self) -> None:
        self._hash_key = await hash_key(self.pool)
        await self.refresh()

    async def refresh(self) -> None:
        generation = await self.pool.fetchval(db.query("keys", "generation"))
        if generation == self._generation:
            return
        by_digest = {}
        for r in await self.pool.fetch(db.query("keys", "live")):
            key = ApiKey(r["name"], r["scope"], tenant=r["tenant"],
                         sources=tuple(r["sources"]), hidden=frozenset(r["hidden_fields"]),
                         key_id=r["id"], expires_at=r["expires_at"],
                         actor=f"key:{r['name']}#{r['id']}")
            by_digest[bytes(r["digest"])] = _Entry(key)
            if r["previous_digest"] is not None:
                by_digest[bytes(r["previous_digest"])] = _Entry(
                    key, r["previous_until"].timestamp())
        shared: dict[str, dict[str, frozenset[str]]] = {}
        for r in await self.pool.fetch(db.query("tenants", "shares")):
            shared.setdefault(r["subscriber"], {})[r["source"]] = frozenset(
                () if r["fields"] is None else set(RECORD_FIELDS) - set(r["fields"]))
        self._by_digest, self._shared, self._generation = by_digest, shared, generation

    def shared_with(self, tenant: str) -> dict[str, frozenset[str]]:
        """The datasets shared with ``tenant``, each with the fields its share hides."""
        return self._shared.get(tenant, {})

    def find(self, secret: str) -> ApiKey | None:
        """The live key whose secret is ``secret`` (not expired, not rotated out)."""
        if not self._hash_key or not secret.startswith(PREFIX):
            return None
        entry = self._by_digest.get(digest(self._hash_key, secret))
        if entry is None:
            return None
        now = time.time()
        key = entry.key
        if (entry.until is not None and now >= entry.until) or (
                key.expires_at is not None and now >= key.expires_at.timestamp()):
            return None
        assert key.key_id is not None
        self._used[key.key_id] = now
        return key

    async def flush_used(self) -> None:
        if not self._used:
            return
        used, self._used = self._used, {}
        await self.pool.execute(db.query("keys", "used"), list(used),
                                [dt.datetime.fromtimestamp(t, dt.UTC) for t in used.values()])

    async def run(self) -> None:
        """Reload on change, write last-used times; until cancelled (then write them)."""
        flushed = time.monotonic()
        try:
            while True:
                await asyncio.sleep(self.poll_s)
                try:
                    await self.refresh()
                    if time.monotonic() - flushed >= self.flush_s:
                        await self.flush_used()
                        flushed = time.monotonic()
                except Exception as exc:   # the database is away: keep the keys we have
                    log.warning("cannot reload API keys", error=str(exc)[:200])
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush_used())
