"""The dataset catalog: ``GET /catalog`` lists the datasets (sources) the caller may read,
its tenant's and those published to it, with what a consumer needs to judge one: owner,
description and tags, fields with their types and rules, rows, freshness, last success,
reject rate over 7 days, schema changes, and where to see a sample.

Which datasets are listed is row-level security's answer (``etl_sources`` is read as the
API's role), not this module's.
"""
from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get

from etlsvc import db
from etlsvc.api.http import (
    READ,
    caller_tenant,
    envelope,
    hidden_fields,
    read_pool,
    service_of,
)

#: What each normalized field holds, as /data gives it.
FIELD_TYPES = {"source_id": "text", "title": "text", "description": "text",
               "category": "text", "amount": "decimal, as a string", "url": "text",
               "tags": "list of text", "event_time": "timestamp (RFC 3339)"}


@get("/catalog", summary="The datasets the caller may read, with their metadata", **READ)
async def catalog(request: Request) -> dict[str, Any]:
    """Each dataset the caller's key reads: its own tenant's and those shared with it
    (``shared: true``; read-only, with the fields the share exposes)."""
    configured = {s.name: s for s in service_of(request).cfg.sources}
    hidden = hidden_fields(request)
    tenant = caller_tenant()
    out = []
    for r in await read_pool(request).fetch(db.query("catalog", "datasets")):
        name = r["source"]
        src = configured.get(name)
        concealed = hidden.of(name) if hidden is not None else frozenset()
        fields = []
        if src is not None:
            for field, column in src.fields.mapped().items():
                if field in concealed:
                    continue
                rule = src.rules.get(field)
                fields.append({"name": field, "type": FIELD_TYPES[field], "from": column,
                               "rules": {k: v for k, v in msgspec.to_builtins(rule).items()
                                         if v not in (None, False)} if rule else {}})
        out.append({
            "name": name, "owner": r["owner"], "kind": src.kind if src else None,
            "shared": r["owner"] != tenant,
            "description": r["description"], "tags": list(r["tags"]), "fields": fields,
            "rows": r["rows"], "freshness": r["freshness"], "last_success": r["last_success"],
            "reject_rate_7d": None if r["reject_rate_7d"] is None else
            round(r["reject_rate_7d"], 4),
            "schema_changes": r["schema_changes"] or [],
            "sample": f"/data?source={name}&limit=10"})
    return envelope(request, out)


HANDLERS = [catalog]
