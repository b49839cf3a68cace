"""The change feed: the writes of ``normalized_data``, each once, in an order commits agree with.

Owns feed positions (the tokens consumers keep), reading a page of changes, waiting for new
ones, and pruning old tombstones. The ordering argument lives in
``sql/migrations/0005_change_feed.sql``: rows carry the id of the transaction that last wrote
them (deletes leave tombstones with theirs), and the feed only serves ids below the xmin of
its own snapshot, where no transaction can still commit. A position is therefore final: a
consumer that has read up to it has read every change before it, whatever order the writers
committed in, and will never be sent one of them again.

By default the feed is compacted: each row appears at its latest write. A row written twice
between two reads of a consumer is sent once, with its latest content; consumers apply
``insert`` and ``update`` alike as an upsert by ``id``. The feed of every version
(``every_version``) also sends the versions replaced since, each at the position of the
transaction that wrote it (``sql/migrations/0016_versions.sql`` keeps them).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import asyncpg

from etlsvc import db

#: Seconds between two looks at the database while a consumer waits for news.
POLL_EVERY = 0.25
MAX_XID = 2**64 - 1

_TOKEN = re.compile(r"(\d{1,20})-(\d{1,19})(?:\.([0-9a-f]{8}))?")


class Position(NamedTuple):
    """A place in the feed: after the change (xid, id)."""

    xid: int
    id: int

    @property
    def token(self) -> str:
        return f"{self.xid}-{self.id}"


BEGINNING = Position(0, 0)


class ForeignToken(ValueError):
    """A token the feed gave to another caller."""


def parse_token(token: str, tag: Callable[[Position], str] | None = None) -> Position:
    """The position a token stands for (``0``: the beginning); ValueError if it is not one,
    or if it carries a tag other than ``tag(position)``: the tag says whom the feed gave it
    to (``api/http.feed_token``). A token without a tag (given before tenants) is taken."""
    if token == "0":
        return BEGINNING
    m = _TOKEN.fullmatch(token)
    if not m or int(m.group(1)) > MAX_XID or int(m.group(2)) > db.MAX_ID:
        raise ValueError(f"{token!r} is not a change feed token (the 'next' of a page, "
                         "'0' for the beginning or 'now' for new changes only)")
    position = Position(int(m.group(1)), int(m.group(2)))
    if m.group(3) is not None and tag is not None and m.group(3) != tag(position):
        raise ForeignToken("this change feed token was given to another caller")
    return position


class Page(NamedTuple):
    """Changes after a position, where to continue, and whether more are waiting."""

    changes: list[asyncpg.Record]
    next: Position
    has_more: bool
    #: The position is older than the last tombstone pruned: deletes may have been missed.
    expired: bool = False


async def head(pool: Any) -> Position:
    """The position of the feed's head now: only changes committed later come after it."""
    horizon = await pool.fetchval(db.query("api", "feed_head"))
    return Position(horizon, 0)


async def read(pool: Any, after: Position, limit: int, every_version: bool = False) -> Page:
    """Up to ``limit`` changes after ``after`` (none, if no transaction has ended since);
    ``every_version``: each version written, not only the latest of each row."""
    rows = await pool.fetch(db.query("api", "changes"), after.xid, after.id, limit + 1,
                            every_version)
    first = rows[0]
    if after != BEGINNING and (
            (first["pruned_xid"] is not None
             and after < (first["pruned_xid"], first["pruned_id"]))
            or (first["versions_pruned_xid"] is not None
                and after.xid < first["versions_pruned_xid"])):
        return Page([], after, False, expired=True)
    changes = [r for r in rows if r["xid"] is not None]
    if len(changes) > limit:
        last = changes[limit - 1]
        return Page(changes[:limit], Position(last["xid"], last["id"]), True)
    if not changes and after == BEGINNING:
        # Nothing yet (a transaction somewhere holds the horizon back): a consumer that has
        # seen nothing stays at the beginning. Moved to the horizon, it could land below the
        # retention limit and get 410 for deletes of rows it never saw.
        return Page(changes, BEGINNING, False)
    # Everything below the horizon has been read: continue from there (unless a replica
    # further ahead already gave the consumer a later position).
    return Page(changes, max(after, Position(first["horizon"], 0)), False)


async def wait(pool: Any, after: Position, limit: int, seconds: float,
               every_version: bool = False) -> Page:
    """Like ``read``, but when nothing is new, look again until ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        page = await read(pool, after, limit, every_version)
        if page.changes or page.expired or time.monotonic() >= deadline:
            return page
        after = page.next
        await asyncio.sleep(min(POLL_EVERY, max(0.0, deadline - time.monotonic())))


class DataVersion:
    """Which data ``GET /data`` reads from: the sum of the write counters
    (``sql/migrations/0005_change_feed.sql``). Pages carry it in their ETag, so
    ``If-None-Match`` is answered without reading the page.

    The version is read again every ``max_age`` seconds, in the background: no request waits
    for that read. (Requests that did wait, queued behind it for a pool connection and for
    the busy event loop, made a 304's p99 10 times its p50.) A version older than
    ``wait_after`` seconds (nothing asked for a while, or the read failed) is waited for: a
    page's ETag is never more than that behind the data, and a database that is away
    answers 503, not 304.
    """

    def __init__(self, max_age: float = POLL_EVERY, wait_after: float = 2 * POLL_EVERY) -> None:
        self.max_age = max_age
        self.wait_after = wait_after
        self._value = 0
        self._read_at = -math.inf
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task[None] | None = None

    async def get(self, pool: Any) -> int:
        age = time.monotonic() - self._read_at
        if age >= self.wait_after:
            async with self._lock:
                if time.monotonic() - self._read_at >= self.wait_after:
                    await self._read(pool)
        elif age >= self.max_age and self._refresh is None:
            self._refresh = asyncio.create_task(self._read_quietly(pool))
        return self._value

    async def _read(self, pool: Any) -> None:
        read_at = time.monotonic()
        self._value = await pool.fetchval(db.query("api", "data_version"))
        self._read_at = read_at

    async def _read_quietly(self, pool: Any) -> None:
        try:
            await self._read(pool)
        except Exception:        # the next request tries again, or waits for it (503)
            pass
        finally:
            self._refresh = None


class DataVersions:
    """A ``DataVersion`` for each read scope (``db.READ_SCOPE``): a tenant's pages change
    with the writes to the sources it reads, and their ETags tell nothing of another
    tenant's. (Its refresh runs in a task made by a request of that scope, which inherits
    the scope.) One per API key and tenant seen: as many as there are keys."""

    def __init__(self) -> None:
        self._of: dict[db.ReadScope | None, DataVersion] = {}

    async def get(self, pool: Any) -> int:
        scope = db.READ_SCOPE.get()
        if (version := self._of.get(scope)) is None:
            version = self._of[scope] = DataVersion()
        return await version.get(pool)

