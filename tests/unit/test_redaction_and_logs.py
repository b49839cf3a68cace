"""Secret masking in every URL and DSN form, and standard-library log events in etlsvc's stream."""

from __future__ import annotations

import asyncio

import pytest


@pytest.mark.parametrize(("text", "masked"), [
    ("postgresql://etl:hunter2@db:5432/x", "postgresql://etl:***@db:5432/x"),
    ("postgres://:hunter2@db/x", "postgres://:***@db/x"),
    ("postgresql://etl@db/x?password=hunter2&sslmode=require",
     "postgresql://etl@db/x?password=***&sslmode=require"),
    ("postgresql://etl@db/x?sslmode=require&PASSWORD=hunter2",
     "postgresql://etl@db/x?sslmode=require&PASSWORD=***"),
    ("host=db user=etl password=hunter2 dbname=x", "host=db user=etl password=*** dbname=x"),
    ("host=db password = 'hunter2 with spaces' dbname=x", "host=db password = *** dbname=x"),
    ("cannot connect to host=db sslpassword=hunter2", "cannot connect to host=db sslpassword=***"),
    ("https://user:hunter2@example.com/feed", "https://user:***@example.com/feed"),
    ("nothing secret here: a=b, c@d", "nothing secret here: a=b, c@d"),
])
def test_one_masking_function_covers_every_url_and_dsn_form(text: str, masked: str) -> None:
    from etlsvc.logs import redact

    assert redact(text) == masked
    assert "hunter2" not in redact(text)


async def test_stdlib_log_events_reach_the_stream_clean_and_named(tmp_path) -> None:
    import io
    import logging

    from etlsvc.logs import configure_logging
    from etlsvc.logtail import HUB

    configure_logging("info", "json", stream=io.StringIO())
    with HUB.subscribe() as queue:
        logging.getLogger("uvicorn.error").warning("a library speaks")
        event = await asyncio.wait_for(queue.get(), 5)
    assert event["event"] == "a library speaks" and event["logger"] == "uvicorn.error"
    assert not [k for k in event if k.startswith("_")], event
