"""Usage metering: rows and requests served per day, consumer key and dataset, so that a
publisher sees who consumes what (``GET /admin/usage``, ``/metrics``).

Counted in memory as pages are served (a dictionary update; no query per request) and
added to ``etl_usage`` every few seconds and at shutdown by each replica. A replica killed
with ``kill -9`` loses at most its last few seconds of counts.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import Counter
from operator import itemgetter
from typing import Annotated, Any

import structlog
from litestar import Request, get
from litestar.params import FromQuery, QueryParameter

from etlsvc import db, metrics
from etlsvc.api.http import READ_ERRORS, envelope, read_pool

log = structlog.get_logger()


#: A served row's dataset (asyncpg records are read by name).
_SOURCE = itemgetter("source")


class Usage:
    """Counts not yet written: (day, tenant, key, source) → [requests, rows]."""

    def __init__(self, flush_s: float = 5.0) -> None:
        self.flush_s = flush_s
        self._pending: dict[tuple[dt.date, str, str, str], list[int]] = {}

    def count(self, tenant: str, key: str, rows: Any) -> None:
        day = dt.datetime.now(dt.UTC).date()
        for source, n in Counter(map(_SOURCE, rows)).items():
            entry = self._pending.setdefault((day, tenant, key, source), [0, 0])
            entry[0] += 1
            entry[1] += n
            metrics.served(tenant, key, source, n)

    async def flush(self, pool: Any) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            await pool.execute(db.query("usage", "add"), *map(list, zip(
                *((*k, *v) for k, v in pending.items()))))
        except Exception:
            # Counted again with what comes next (the database is away, say).
            for k, (requests, rows) in pending.items():
                entry = self._pending.setdefault(k, [0, 0])
                entry[0] += requests
                entry[1] += rows
            raise

    async def run(self, pool: Any) -> None:
        """Write the counts every ``flush_s`` seconds; until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(self.flush_s)
                try:
                    await self.flush(pool)
                except Exception as exc:
                    log.warning("usage counts not written yet", error=str(exc)[:200])
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush(pool))


@get("/admin/usage", summary="Rows and requests served per day, key and dataset",
     responses=READ_ERRORS, opt={"scope": "admin"})
async def usage(
    request: Request,
    days: Annotated[int, QueryParameter(ge=1, le=366)] = 30,
    source: FromQuery[str | None] = None,
) -> dict[str, Any]:
    """Who consumed the caller's datasets (any tenant's keys, for the datasets it owns), and
    what the caller's own keys consumed, over the last ``days`` days, newest first. Counts
    reach the table every few seconds."""
    await request.app.state.usage.flush(request.app.state.service.database.pool)
    rows = await read_pool(request).fetch(db.query("usage", "page"), days, source)
    return envelope(request, [dict(r) for r in rows])


HANDLERS = [usage]
