"""The audit log: who did what, for which tenant, when, from where, and how it ended.

Every mutating request and admin action of the API (runs started, rejects retried or
ignored, rollbacks, backfills, keys made, rotated or revoked, shares), every failed
authentication, and what ``etlsvc keys`` does, is one row of ``etl_audit``
(``sql/migrations/0019_keys_audit_usage.sql``), which nobody can change or remove rows of.
The API writes a request's row before its answer leaves: a client that saw the answer can
find the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from etlsvc import db

log = structlog.get_logger()


@dataclass
class Entry:
    action: str
    actor: str
    outcome: str                   # ok, denied, failed
    tenant: str | None = None
    target: str | None = None
    status: int | None = None
    request_id: str | None = None
    client: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


async def record(pool: Any, entry: Entry) -> None:
    """Add ``entry`` to the log. A failure to write it is logged, not raised: the action
    it records has happened (or been refused) already."""
    try:
        await pool.execute(db.query("audit", "add"), entry.tenant, entry.actor,
                           entry.action, entry.target, entry.outcome, entry.status,
                           entry.request_id, entry.client, entry.details)
    except Exception as exc:
        log.error("audit entry not written", action=entry.action, actor=entry.actor,
                  outcome=entry.outcome, error=str(exc)[:200])
