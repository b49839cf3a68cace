"""The shapes a source has shown (``etl_schema_columns``), read and written.

Owns the I/O of schema drift (``transform/drift.py`` judges; this remembers): the known
shape read when a run starts, and the shape each batch showed, written in the batch's
transaction.
"""

from __future__ import annotations

import asyncpg

from etlsvc import db


async def known(conn: asyncpg.Connection, source: str) -> dict[str, str]:
    """The source's known shape (empty before its first run)."""
    return {r["name"]: r["type"] for r in await conn.fetch(db.query("drift", "known"), source)}


async def record(conn: asyncpg.Connection, source: str, stream: str, run_id: int,
                 shape: dict[str, str], whole: bool) -> None:
    """Record the shape a batch showed (in the batch's transaction); ``whole``: it is the
    stream's whole shape now (columns it lacks are forgotten)."""
    if shape:
        await conn.execute(db.query("drift", "record"), source, stream, run_id, list(shape),
                           list(shape.values()))
        if whole:
            await conn.execute(db.query("drift", "forget"), source, stream, list(shape))
