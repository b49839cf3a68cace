"""Administration of a tenant (admin keys): ``/admin/keys`` (make, list, rotate, revoke),
``/admin/audit`` (the tenant's audit log), and the audit itself: the ASGI layer that writes
every mutating request and every refused key to ``etl_audit`` (``runtime/audit.py``).

Keys live in ``etl_api_keys``, which the API's role cannot read: they are managed on the
service's own connections, always within the caller's tenant.
"""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody, PathParameter, QueryParameter
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from etlsvc import db
from etlsvc.api.http import (
    MUTATING,
    READ_ERRORS,
    WRITE_ERRORS,
    ApiError,
    audit_request,
    caller_tenant,
    configured_source,
    decode_cursor,
    encode_cursor,
    envelope,
    note,
    read_pool,
    require_json_body,
    service_of,
)
from etlsvc.contract import NAME_PATTERN, RECORD_FIELDS
from etlsvc.errors import AccessError
from etlsvc.runtime import keys

ADMIN: dict[str, Any] = {"responses": WRITE_ERRORS, "opt": {"scope": "admin"}}


def audited(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: the audit entry of a mutating request, written before the answer
    leaves (``http.audit_request``). A read is audited only if its key is refused, by the
    key check itself: reads pay nothing for the audit."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await app(scope, receive, send)
            return

        async def send_audited(message: Message) -> None:
            if message["type"] == "http.response.start":
                await audit_request(scope, message["status"])
            await send(message)

        await app(scope, receive, send_audited)

    return middleware


def _caller(request: Request) -> keys.ApiKey:
    key = request.scope["state"]["key"]
    if key.sources:
        # A key narrowed to some sources does not make keys for the whole tenant.
        raise ApiError(403, "forbidden", f"the API key {key.name!r} is limited to some "
                       "sources: managing keys takes an admin key of the whole tenant")
    return key


def _access_error(exc: AccessError) -> ApiError:
    return ApiError(404 if exc.code == "not_found" else 400, exc.code, str(exc))


class KeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A key to make: its name (unique among the tenant's live keys), scope, the sources it
    is limited to (globs), the fields hidden from it, and when it expires."""

    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    scope: str = "read"
    sources: list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]] = []
    hidden_fields: list[str] = []
    expires_at: dt.datetime | None = None


@post("/admin/keys", status_code=201, summary="Make an API key (its secret is shown once)",
      guards=[require_json_body], **{**ADMIN, "opt": {"scope": "admin",
                                                      "audit": "key.create"}})
async def create_key(request: Request, data: JSONBody[KeyRequest]) -> dict[str, Any]:
    """A new key of the caller's tenant. ``secret`` is in this answer only: only a keyed
    hash of it is kept."""
    caller = _caller(request)
    if data.expires_at is not None and data.expires_at.tzinfo is None:
        data.expires_at = data.expires_at.replace(tzinfo=dt.UTC)
    try:
        row, secret = await keys.create(
            service_of(request).database.pool, tenant=caller.tenant, name=data.name,
            scope=data.scope, sources=data.sources, hidden=data.hidden_fields,
            expires_at=data.expires_at, actor=caller.who)
    except AccessError as exc:
        raise _access_error(exc) from None
    note(request, f"key {row['id']}", name=data.name, scope=data.scope)
    await request.app.state.key_store.refresh()
    return envelope(request, {**keys.view(row), "secret": secret})


@get("/admin/keys", summary="The tenant's API keys (never their secrets)",
     responses=READ_ERRORS, opt={"scope": "admin"})
async def list_keys(request: Request) -> dict[str, Any]:
    caller = _caller(request)
    await request.app.state.key_store.flush_used()      # this replica's last uses, now
    rows = await keys.listing(service_of(request).database.pool, caller.tenant)
    return envelope(request, [keys.view(r) for r in rows])


class RotateRequest(msgspec.Struct, forbid_unknown_fields=True):
    #: Seconds the current secret stays valid beside the new one.
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 3600


KeyId = Annotated[int, PathParameter(ge=1, le=db.MAX_ID)]


@post("/admin/keys/{key_id:int}/rotate", status_code=200,
      summary="A new secret for a key; the old one stays valid for a grace period",
      guards=[require_json_body], **{**ADMIN, "opt": {"scope": "admin",
                                                      "audit": "key.rotate"}})
async def rotate_key(request: Request, key_id: KeyId,
                     data: JSONBody[RotateRequest | None] = None) -> dict[str, Any]:
    caller = _caller(request)
    grace = (data or RotateRequest()).grace_s
    note(request, f"key {key_id}", grace_s=grace)       # a refused rotation names it too
    try:
        row, secret = await keys.rotate(service_of(request).database.pool, key_id,
                                        caller.tenant, grace)
    except AccessError as exc:
        raise _access_error(exc) from None
    await request.app.state.key_store.refresh()
    return envelope(request, {**keys.view(row), "secret": secret})


@post("/admin/keys/{key_id:int}/revoke", status_code=200,
      summary="Revoke a key: refused by every replica within seconds",
      **{**ADMIN, "opt": {"scope": "admin", "audit": "key.revoke"}})
async def revoke_key(request: Request, key_id: KeyId) -> dict[str, Any]:
    caller = _caller(request)
    note(request, f"key {key_id}")
    try:
        row = await keys.revoke(service_of(request).database.pool, key_id, caller.tenant)
    except AccessError as exc:
        raise _access_error(exc) from None
    await request.app.state.key_store.refresh()
    return envelope(request, keys.view(row))


class AuditEntry(msgspec.Struct):
    id: int
    at: dt.datetime
    tenant: str | None
    actor: str
    action: str
    target: str | None
    outcome: str
    status: int | None
    request_id: str | None
    client: str | None
    details: dict[str, Any]


@get("/admin/audit", summary="The tenant's audit log, newest first", responses=READ_ERRORS,
     opt={"scope": "admin"})
async def audit_log(
    request: Request,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    cursor: FromQuery[str | None] = None,
    action: FromQuery[str | None] = None,
    actor: FromQuery[str | None] = None,
) -> dict[str, Any]:
    """Who did what, when, from where, and how it ended: every mutating request, admin
    action and refused key of the caller's tenant (row-level security: only its)."""
    filters = ("audit", action, actor)
    before = decode_cursor(cursor, filters) if cursor else db.MAX_ID
    rows = await read_pool(request).fetch(db.query("audit", "page"), before, limit + 1,
                                          action, actor)
    more = len(rows) > limit
    rows = rows[:limit]
    return envelope(request, [AuditEntry(**dict(r)) for r in rows], {
        "limit": limit, "has_more": more,
        "next_cursor": encode_cursor(rows[-1]["id"], filters) if more else None,
        "tenant": caller_tenant()})


class ShareRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Publish one of the caller's datasets to another tenant, with the record fields it
    sees (none given: all)."""

    source: str
    tenant: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    fields: list[Literal[RECORD_FIELDS]] | None = None  # type: ignore[valid-type]


@post("/admin/shares", status_code=201, summary="Publish a dataset to another tenant",
      guards=[require_json_body], **{**ADMIN, "opt": {"scope": "admin",
                                                      "audit": "share.create"}})
async def create_share(request: Request, data: JSONBody[ShareRequest]) -> dict[str, Any]:
    """The tenant's keys read the dataset, read-only, through /data, /data/changes and
    /catalog, with the fields given."""
    caller = _caller(request)
    note(request, f"{data.source} to {data.tenant}", fields=data.fields)
    src = configured_source(request, data.source)
    if data.tenant == caller.tenant:
        raise ApiError(400, "bad_request", "a dataset is not shared with its own tenant")
    row = await service_of(request).database.pool.fetchrow(
        db.query("tenants", "share"), src.name, data.tenant, data.fields, caller.tenant)
    await request.app.state.key_store.refresh()
    return envelope(request, dict(row))


@get("/admin/shares", summary="Shares of the tenant's datasets, and those made to it",
     responses=READ_ERRORS, opt={"scope": "admin"})
async def list_shares(request: Request) -> dict[str, Any]:
    caller = _caller(request)
    rows = await service_of(request).database.pool.fetch(db.query("tenants", "list_shares"),
                                                         caller.tenant)
    return envelope(request, [dict(r) for r in rows])


@delete("/admin/shares/{source:str}/{tenant:str}", status_code=200,
        summary="Withdraw a dataset from a tenant",
        **{**ADMIN, "opt": {"scope": "admin", "audit": "share.delete"}})
async def delete_share(request: Request, source: FromPath[str],
                       tenant: FromPath[str]) -> dict[str, Any]:
    caller = _caller(request)
    note(request, f"{source} to {tenant}")
    row = await service_of(request).database.pool.fetchrow(
        db.query("tenants", "unshare"), source, tenant, caller.tenant)
    if row is None:
        raise ApiError(404, "not_found", f"no share of {source!r} to {tenant!r} made through "
                       "the API (a share of the config is withdrawn in the config)")
    await request.app.state.key_store.refresh()
    return envelope(request, dict(row))


@get("/me", summary="Who the caller is: tenant, key, scope, grants", responses=READ_ERRORS,
     opt={"scope": "read"})
async def me(request: Request) -> dict[str, Any]:
    """The tenant the caller acts for and what its key grants (the console shows it and
    offers only what the scope allows). Without a key, where reads are public: the
    default tenant, read."""
    key = request.scope["state"].get("key")
    if key is None:
        return envelope(request, {"tenant": caller_tenant(), "key": None, "scope": "read",
                                  "sources": [], "hidden_fields": []})
    return envelope(request, {"tenant": key.tenant, "key": key.name, "scope": key.scope,
                              "sources": list(key.sources),
                              "hidden_fields": sorted(key.hidden)})


HANDLERS = [me, create_key, list_keys, rotate_key, revoke_key, audit_log, create_share,
            list_shares, delete_share]
