"""Extract: where records come from. One module per kind of source (see ``contract.py``).

This is the one place kinds are registered: a new kind is added to ``KINDS`` below.
"""

from __future__ import annotations

from typing import Any

from etlsvc.contract import SourceKind
from etlsvc.extract import (
    csv_files,
    json_api,
    jsonl_files,
    mysql_cdc,
    nats_stream,
    pg_cdc,
    rss_feeds,
    sql_tables,
)

#: Every kind of source, by name.
KINDS: dict[str, SourceKind] = {k.name: k for k in (
    csv_files.KIND, json_api.KIND, rss_feeds.KIND, jsonl_files.KIND, sql_tables.KIND,
    nats_stream.KIND, pg_cdc.KIND, mysql_cdc.KIND,
)}


def kind_of(src: Any) -> SourceKind:
    """The kind of a source config."""
    return KINDS[src.kind]
