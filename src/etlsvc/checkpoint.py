"""Checkpoints: per source and stream, where the next run resumes.

Owns reading and writing ``etl_checkpoints``. A write happens only inside the transaction
of the batch it describes (see ``pipeline.py``), so a checkpoint never runs ahead of the data.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from etlsvc import db


async def read(conn: asyncpg.Connection | asyncpg.Pool, source: str) -> dict[str, Any]:
    """{stream: state} of every stream of ``source``."""
    rows = await conn.fetch(db.query("checkpoints", "read"), source)
    return {r["stream"]: r["state"] for r in rows}


async def write(conn: asyncpg.Connection, source: str, stream: str, state: dict[str, Any],
                run_id: int) -> None:
    """Record the position after a batch (call inside the batch's transaction)."""
    await conn.execute(db.query("checkpoints", "write"), source, stream, state, run_id)

