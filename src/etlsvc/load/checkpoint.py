"""Checkpoints: per source and stream, where the next run resumes.

Owns reading and writing ``etl_checkpoints``. A write happens only inside the transaction
of the batch it describes (``load/write.commit``), so a checkpoint never runs ahead of the
data.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from etlsvc import db
from etlsvc.contract import Checkpoints


async def read(conn: asyncpg.Connection, source: str, *, run_id: int,
               full_refresh: bool = False) -> Checkpoints:
    """Where run ``run_id`` of ``source`` resumes, stream by stream.

    With ``full_refresh`` only the streams this run has committed count: a run that lost its
    database and reconnected goes on where it was, never from the start again.
    """
    rows = await conn.fetch(db.query("checkpoints", "read"), source)
    found = Checkpoints({r["stream"]: r["state"] for r in rows
                         if not full_refresh or r["run_id"] == run_id})
    found.this_run = {r["stream"] for r in rows if r["run_id"] == run_id}
    return found


async def write(conn: asyncpg.Connection, source: str, stream: str, state: dict[str, Any],
                run_id: int) -> None:
    """Record the position after a batch (call inside the batch's transaction)."""
    await conn.execute(db.query("checkpoints", "write"), source, stream, state, run_id)


async def forget(conn: asyncpg.Connection, source: str) -> int:
    """Drop every checkpoint of ``source``; returns how many there were."""
    status = await conn.execute(db.query("checkpoints", "forget"), source)
    return int(status.split()[-1])
