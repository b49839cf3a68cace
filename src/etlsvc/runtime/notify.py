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
  other answers are final. The outcome is stored on the notification's row;
* ``timeout_s`` bounds each attempt as a whole (connecting, sending, the whole answer): a
  receiver that trickles its answer a byte at a time cannot hold a delivery longer;
* at least once: a process that stops (at its shutdown grace) or dies before a delivery is
  over leaves the row without outcomes, and a later process sends it again (the sweep of
  ``serve``, or the start of ``run``), with the same ``X-Etlsvc-Delivery`` id for a
  receiver to deduplicate on. A sender holds a row for the longest its delivery can take
  (``due_at``), so a live one's deliveries are not sent twice.

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

#: Deliveries under way in this process (``drain`` waits for them), and the notifications
#: they hold.
_pending: set[asyncio.Task[None]] = set()
_holding: set[int] = set()
#: The longest a webhook asks a delivery to wait between attempts (``Retry-After``).
MAX_WAIT_S = 60.0


def emit(pool: asyncpg.Pool, cfg: NotifyConfig, event: str, source: str, summary: str, *,
         run_id: int | None = None, details: dict[str, Any] | None = None,
         once: str | None = None) -> None:
    """Record and send ``event`` in the background (nothing when no webhook wants it).
    ``once``: a key that makes the event unique (a second emit with it sends nothing)."""
    hooks = wanting(cfg, event, source)
    if not hooks:
        return
    _start(_record_and_send(pool, hooks, event, source, summary, run_id, details or {},
                            once or f"{event}:{run_id}"))


def _start(coro: Any) -> None:
    task = asyncio.create_task(coro)
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def hold_s(hooks: list[Webhook]) -> float:
    """The longest a delivery to ``hooks`` can take: every attempt timing out, every wait
    the longest honoured ``Retry-After``; a little more for recording it."""
    return max((h.max_attempts * h.timeout_s + (h.max_attempts - 1) * MAX_WAIT_S
                for h in hooks), default=0.0) + 10.0


async def resend_undelivered(pool: asyncpg.Pool, cfg: NotifyConfig) -> None:
    """Send again, in the background, the notifications whose sender stopped or died before
    their delivery was over (to the webhooks that want them now)."""
    if not cfg.webhooks:
        return
    rows = await pool.fetch(db.query("notify", "take_undelivered"), hold_s(cfg.webhooks))
    for row in rows:
        hooks = wanting(cfg, row["event"], row["source"])
        log.info("sending a notification again", notify_event=row["event"],
                 delivery=row["id"], webhooks=len(hooks))
        _start(_send(pool, hooks, row))


async def drain(pool: asyncpg.Pool, within: float | None = None) -> None:
    """Wait for the deliveries under way, at most ``within`` seconds: a CLI run's process
    must not exit before its failure is announced, and ``serve``'s shutdown must not wait
    beyond its grace. What is cut short is given back to the next process."""
    if not _pending:
        return
    _, unfinished = await asyncio.wait(list(_pending), timeout=within)
    if not unfinished:
        return
    cut = sorted(_holding)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    log.warning("deliveries cut short at shutdown; the next process sends them",
                deliveries=cut)
    try:
        await pool.execute(db.query("notify", "release"), cut)
    except Exception as exc:       # they become due at their hold's end instead
        log.warning("could not give back the deliveries cut short", error=describe(exc))


def wanting(cfg: NotifyConfig, event: str, source: str) -> list[Webhook]:
    """The webhooks that want ``event`` of ``source``."""
    return [h for h in cfg.webhooks
            if event in h.events and (not h.sources or source in h.sources)]


async def _record_and_send(pool: asyncpg.Pool, hooks: list[Webhook], event: str, source: str,
                           summary: str, run_id: int | None, details: dict[str, Any],
                           once: str) -> None:
    try:
        row = await pool.fetchrow(db.query("notify", "record"), event, source, run_id, once,
                                  summary, details, hold_s(hooks))
    except Exception as exc:       # the database is away: say it in the log, at least
        log.error("could not record a notification", notify_event=event, summary=summary,
                  error=describe(exc))
        return
    if row is None:                # recorded already (another replica, an earlier sweep)
        return
    await _send(pool, hooks, {**dict(row), "event": event, "source": source, "run_id": run_id,
                              "summary": summary, "details": details})


async def _send(pool: asyncpg.Pool, hooks: list[Webhook], row: Any) -> None:
    """Deliver a recorded notification to ``hooks``; store the outcomes."""
    payload = {"id": row["id"], "event": row["event"], "source": row["source"],
               "run_id": row["run_id"], "summary": row["summary"], "details": row["details"],
               "occurred_at": row["created_at"].isoformat(),
               "service": {"host": HOST, "version": __version__}}
    _holding.add(row["id"])
    try:
        outcomes = await asyncio.gather(*(_deliver(h, payload) for h in hooks))
    finally:
        _holding.discard(row["id"])
    try:
        await pool.execute(db.query("notify", "delivered"), row["id"],
                           list(outcomes) or ["no webhook wants it"])
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
                async with asyncio.timeout(hook.timeout_s):     # the attempt as a whole
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
            except TimeoutError:
                problem = f"no whole answer within timeout_s ({hook.timeout_s:g} s)"
            if attempt < hook.max_attempts:
                await asyncio.sleep(min(wait, MAX_WAIT_S))
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
