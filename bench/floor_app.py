"""The floor of the read API benchmark: Litestar + asyncpg answering the same three requests
from the same table with one keyset query and msgspec encoding, and nothing else (no
envelope extras, middleware, logging, validation of filters).

usage: DATABASE_URL=... python bench/floor_app.py PORT
"""

from __future__ import annotations

import os
import sys

import asyncpg
import uvicorn
from litestar import Litestar, Response, get

QUERY = """SELECT id, kind, source, source_id, title, description, category, amount::text AS amount,
       url, tags, event_time, created_at, updated_at FROM normalized_data
WHERE id > $1 AND ($2::text IS NULL OR category = $2) ORDER BY id LIMIT $3"""


async def startup(app: Litestar) -> None:
    app.state.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=4,
                                               max_size=10)


@get("/data")
async def data(after: int = 0, limit: int = 100, category: str | None = None) -> Response:
    rows = await app.state.pool.fetch(QUERY, after, category, limit)
    return Response([dict(r) for r in rows])


app = Litestar([data], on_startup=[startup], logging_config=None)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
