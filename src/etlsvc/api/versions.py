"""Moments: what ``as_of`` names, made into the snapshot that reads as of it.

Owns parsing an ``as_of`` (a snapshot, a change-feed token or a time), resolving a time into
the snapshot that sees exactly the transactions stamped by then, and refusing a moment the
kept versions cannot answer (410) or that this server has not reached yet (503). Why a
snapshot is the moment, and how a time becomes one: ``sql/migrations/0016_versions.sql``
and ``sql/queries/versions.sql``.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from typing import Any, NamedTuple

from etlsvc import db
from etlsvc.api import changes
from etlsvc.api.http import ApiError, token_tag

#: How long a read as of a recent time waits for the transactions running then to end.
SETTLE_WITHIN = 5.0
_SNAPSHOT = re.compile(r"(\d{1,20}):(\d{1,20}):((?:\d{1,20})(?:,\d{1,20})*)?")


class Moment(NamedTuple):
    """A resolved ``as_of``: the snapshot, as PostgreSQL writes one, and its xmin."""

    snapshot: str
    xmin: int


def _parse_snapshot(text: str) -> Moment | None:
    m = _SNAPSHOT.fullmatch(text)
    if not m:
        return None
    xmin, xmax = int(m.group(1)), int(m.group(2))
    xip = [int(x) for x in m.group(3).split(",")] if m.group(3) else []
    if not (3 <= xmin <= xmax <= changes.MAX_XID and all(xmin <= x < xmax for x in xip)
            and xip == sorted(set(xip)) and (not xip or xip[0] == xmin)):
        return None
    return Moment(text, xmin)


def _parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


async def resolve(pool: Any, as_of: str) -> Moment:
    """The moment ``as_of`` names; 400 if it names none, 503 if a time cannot be answered
    yet. Whether it can be read here is ``check``'s."""
    if (moment := _parse_snapshot(as_of)) is None:
        try:
            position = changes.parse_token(as_of, token_tag)
        except changes.ForeignToken as exc:
            raise ApiError(400, "bad_as_of", str(exc)) from None
        except ValueError:
            position = None
        if position is not None:
            # The feed's state after the token's transaction: every one up to it (all of
            # them below the feed's horizon have ended).
            upto = max(position.xid + 1, 3)
            moment = Moment(f"{upto}:{upto}:", upto)
        elif (when := _parse_time(as_of)) is not None:
            moment = await _at_time(pool, when)
        else:
            raise ApiError(400, "bad_as_of", f"as_of={as_of!r} is neither a time (ISO 8601, "
                           "e.g. 2026-12-01T09:00:00Z), a change-feed token nor a snapshot "
                           "(the as_of of an earlier answer)")
    return moment


async def _at_time(pool: Any, when: dt.datetime) -> Moment:
    ref = await pool.fetchrow(db.query("versions", "time_reference"), when)
    if when > ref["now"]:
        raise ApiError(400, "bad_as_of", f"as_of {when.isoformat()} is in the future "
                       f"(the database's clock says {ref['now'].isoformat()})")
    deadline = time.monotonic() + SETTLE_WITHIN
    while not await pool.fetchval(db.query("versions", "settled"), ref["snap"]):
        if time.monotonic() >= deadline:
            raise ApiError(503, "as_of_unsettled", f"transactions that were writing at "
                           f"{when.isoformat()} are still running; retry", retry_after=1)
        await asyncio.sleep(0.05)
    snapshot = await pool.fetchval(db.query("versions", "time_snapshot"), when, ref["snap"],
                                   ref["snap_at"])
    return Moment(snapshot, int(snapshot.split(":", 1)[0]))


def reading_sql(name: str, snapshot_param: str) -> str:
    """versions.sql's statement ``name`` with the check of its moment (``moment_check``,
    on its snapshot parameter) in it: one round trip reads and checks."""
    check = db.query("versions", "moment_check").replace("$S", snapshot_param)
    return db.query("versions", name).replace("{check}", check)


def check(row: Any, moment: Moment, source: str | None) -> None:
    """From the check's columns of a read as of ``moment`` (``reading_sql``): 503 if this
    server has not reached the moment yet; 410 if versions it needs were purged (for
    ``source``, or any source that keeps versions), or if ``source`` keeps none."""
    if row["ahead"]:
        raise ApiError(503, "as_of_ahead", "as_of names a moment this server has not reached "
                       "yet (transactions it sees as done are still running here); retry",
                       retry_after=1)
    oldest = None
    for kept in row["horizon"] or ():
        if source is not None and kept["source"] != source:
            continue
        if kept["keep_days"] == 0:
            if source is not None:
                raise ApiError(410, "no_history", f"source {source!r} keeps no versions "
                               "(history_days = 0): it can only be read as it is now")
            continue
        if kept["purged_xid"] is not None and int(kept["purged_xid"]) > moment.xmin:
            before = dt.datetime.fromisoformat(kept["purged_before"])
            oldest = before if oldest is None else max(oldest, before)
    if oldest is not None:
        raise ApiError(410, "as_of_expired", "versions from then are past history_days and "
                       f"were purged; the oldest moment available is {oldest.isoformat()}",
                       oldest=oldest.isoformat())
