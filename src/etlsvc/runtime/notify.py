"""Notifications: webhooks on a failed run, an anomaly, schema drift and a stale source.

Owns the ``[[notify.webhooks]]`` config, the payload, its signature and delivery. Each event
is recorded once in ``etl_notifications`` (a replica that finds the same event recorded sends
nothing: a stale source is announced once, not by every replica every sweep), then POSTed to
each webhook that wants it, in the background, with retries:

* payload: a generic JSON document (below), or ``format = "slack"``: ``{"text": …}`` for a
  Slack-compatible incoming webhook;
* ``X-Etlsvc-Event``, ``X-Etlsvc-Delivery`` (the notification's id) and, with ``secret_env``,
  ``X-Etlsvc-Timestamp`` and ``X-Etlsvc-Signature: sha256=HEX``, the HMAC-SHA256 under the
  secret of ``TIMESTAMP.BODY`` (the timestamp guards against replays). The secret comes
  from the environment and is never in a payload or a log;
* retries: on a connection error, a timeout, 429 or 5xx, up to ``max_attempts`` with
  exponential backoff from ``backoff_s`` (a ``Retry-After`` of up to a minute is honoured);
  other answers are final. The outcome is stored on the notification's row.

The generic payload::

    {"id": 12, "event": "run_failed", "source": "items", "run_id": 40,
     "summary": "items: run 40 failed: …", "details": {…},
     "occurred_at": "2026-11-30T12:00:00+00:00", "service": {"host": "…", "version": "…"}}
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from typing import Any

import asyncpg
import httpx
import msgspec
import structlog

from etlsvc import __version__, db
from etlsvc.config import NotifyConfig, Webhook
from etlsvc.errors import describe
from etlsvc.runtime.runs import HOST

log = structlog.get_logger()

#: Deliveries under way in this process (``drain`` waits for them).
_pending: set[asyncio.Task[None]] = set()


def emit(pool: asyncpg.Pool, cfg: NotifyConfig, event: str, source: str, summary: str, *,
         run_id: int | None = None, details: dict[str, Any] | None = None,
         once: str | None = None) -> None:
    """Record and send ``event`` in the background (nothing when no webhook wants it).
    ``once``: a key that makes the event unique (a second emit with it sends nothing)."""
    hooks = [h for h in cfg.webhooks
             if event in h.events and (not h.sources or source in h.sources)]
    if not hooks:
        return
    task = asyncio.create_task(_record_and_send(pool, hooks, event, source, summary, run_id,
                                                details or {}, once or f"{event}:{run_id}"))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def drain() -> None:
    """Wait for the deliveries under way (their retries are bounded): a CLI run's process
    must not exit before its failure is announced."""
    if _pending:
        await asyncio.wait(list(_pending))


async def _record_and_send(pool: asyncpg.Pool, hooks: list[Webhook], event: str, source: str,
                           summary: str, run_id: int | None, details: dict[str, Any],
                           once: str) -> None:
    try:
        row = await pool.fetchrow(db.query("notify", "record"), event, source, run_id, once,
                                  summary, details)
    except Exception as exc:       # the database is away: say it in the log, at least
        log.error("could not record a notification", notify_event=event, summary=summary,
                  error=describe(exc))
        return
    if row is None:                # recorded already (another replica, an earlier sweep)
        return
    payload = {"id": row["id"], "event": event, "source": source, "run_id": run_id,
               "summary": summary, "details": details,
               "occurred_at": row["created_at"].isoformat(),
               "service": {"host": HOST, "version": __version__}}
    outcomes = await asyncio.gather(*(_deliver(h, payload) for h in hooks))
    try:
        await pool.execute(db.query("notify", "delivered"), row["id"], list(outcomes))
    except Exception as exc:
        log.warning("could not store a notification's delivery", error=describe(exc))


def body_of(hook: Webhook, payload: dict[str, Any]) -> bytes:
    """What is POSTed to ``hook``."""
    if hook.format == "slack":
        return msgspec.json.encode({"text": f"etlsvc {payload['event']}: {payload['summary']}"})
    return msgspec.json.encode(payload)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=HEX``: HMAC-SHA256 of ``TIMESTAMP.BODY`` under ``secret``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


async def _deliver(hook: Webhook, payload: dict[str, Any]) -> str:
    """POST with retries; the outcome in a few words (``delivered``, ``failed: …``)."""
    body = body_of(hook, payload)
    delay = hook.backoff_s
    problem = ""
    async with httpx.AsyncClient(timeout=hook.timeout_s, follow_redirects=False) as client:
        for attempt in range(1, hook.max_attempts + 1):
            headers = {"Content-Type": "application/json",
                       "User-Agent": f"etlsvc/{__version__}",
                       "X-Etlsvc-Event": payload["event"],
                       "X-Etlsvc-Delivery": str(payload["id"])}
            if hook.secret_env:
                stamp = str(int(time.time()))
                headers["X-Etlsvc-Timestamp"] = stamp
                headers["X-Etlsvc-Signature"] = signature(
                    os.environ.get(hook.secret_env, ""), stamp, body)
            wait = delay
            try:
                answer = await client.post(hook.url, content=body, headers=headers)
                if answer.status_code < 300:
                    log.info("notification delivered", notify_event=payload["event"],
                             delivery=payload["id"], attempts=attempt)
                    return f"delivered after {attempt} attempt(s)"
                problem = f"HTTP {answer.status_code}"
                if answer.status_code != 429 and answer.status_code < 500:
                    break
                wait = max(delay, _retry_after(answer.headers.get("Retry-After")) or 0)
            except httpx.HTTPError as exc:
                problem = describe(exc)
            if attempt < hook.max_attempts:
                await asyncio.sleep(min(wait, 60.0))
                delay *= 2
    log.error("notification not delivered", notify_event=payload["event"],
              delivery=payload["id"], error=problem, attempts=attempt)
    return f"failed after {attempt} attempt(s): {problem}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None
