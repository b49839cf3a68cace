"""The floor of the read API benchmark: Litestar + asyncpg answering the same requests from
the same table with one keyset query per shape and msgspec encoding, and nothing else (no
envelope extras, middleware, logging, validation of filters); and a constant response.

usage: DATABASE_URL=... python bench/floor_app.py PORT
"""

from __future__ import annotations

import os
import sys

import asyncpg
import uvicorn
from litestar import Litestar, Response, get

COLUMNS = """id, kind, source, source_id, title, description, category, amount::text AS amount,
       url, tags, event_time, created_at, updated_at"""
PAGE = f"SELECT {COLUMNS} FROM normalized_data WHERE id > $1 ORDER BY id LIMIT $2"
BY_CATEGORY = (f"SELECT {COLUMNS} FROM normalized_data WHERE id > $1 AND category = $3 "
               "ORDER BY id LIMIT $2")
STATIC = b'{"data":[],"metadata":{"pagination":null}}'



async def startup(app: Litestar) -> None:
    app.state.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=4,
                                               max_size=10)


@get("/data")
async def data(after: int = 0, limit: int = 100, category: str | None = None) -> Response:
    if category is None:
        rows = await app.state.pool.fetch(PAGE, after, limit)
    else:
        rows = await app.state.pool.fetch(BY_CATEGORY, after, limit, category)
    return Response([dict(r) for r in rows])


@get("/static", media_type="application/json")
async def static() -> bytes:
    """A constant response: what answering a request costs with no database at all."""
    return STATIC


app = Litestar([data, static], on_startup=[startup], logging_config=None)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
