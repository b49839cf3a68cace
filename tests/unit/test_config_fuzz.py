"""The config loader under mutation: every key of a config that uses every section and every
kind, given a wrong type, an out-of-range number, an empty string or a huge value, ends in
a config that works or in one ConfigError line naming that key; never another exception.

The mutations are made on the decoded TOML document (``decode_config`` is ``load_config``
after the TOML parser), so that every value TOML can hold is tried, ``inf`` and ``nan``
included.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from etlsvc.config import Config, decode_config
from etlsvc.errors import ConfigError
from etlsvc.schedule import schedule_seconds, tick_window

FIELDS = {"source_id": "id", "title": "title", "amount": "amount", "event_time": "ts"}

#: A config with every section and one source of every kind, each with its optional tables.
FULL: dict[str, Any] = {
    "database": {"url": "postgresql://etl@127.0.0.1:5432/etl", "min_pool_size": 1,
                 "max_pool_size": 10, "connect_timeout": 10.0, "reconnect_timeout": 60.0,
                 "sslmode": "", "sslrootcert": ""},
    "embedded": {"data_dir": ".etlsvc", "pg_version": 18},
    "log": {"level": "info", "format": "json"},
    "server": {"host": "127.0.0.1", "port": 8000, "rate_limit_per_minute": 1200,
               "read_statement_timeout_ms": 5000, "public_read": True,
               "change_feed_retention_days": 7.0, "maintenance_every_s": 3600.0,
               "shutdown_grace_s": 20.0, "request_header_timeout_s": 10.0,
               "request_deadline_s": 6.0},
    "pipeline": {"workers": 0, "worker_niceness": 10, "connections_per_run": 2,
                 "parallel_streams": 4, "parallel_runs": 4},
    "notify": {"webhooks": [{"url": "http://127.0.0.1:9/hook", "events": ["run_failed"],
                             "format": "generic", "timeout_s": 10.0, "max_attempts": 5,
                             "backoff_s": 1.0}]},
    "sources": [
        {"name": "files", "kind": "csv", "path": "data/*.csv", "schedule": "5m",
         "batch_size": 10_000, "max_error_rate": 0.05, "encoding": "utf-8", "delimiter": ",",
         "max_record_bytes": 1 << 20, "retention_days": 30.0, "schema_drift": "evolve",
         "deletes": "detect", "max_delete_fraction": 0.5,
         "fields": FIELDS,
         "rules": {"amount": {"min": 0, "max": 100}, "title": {"required": True}},
         "anomaly": {"window": 20, "min_runs": 5, "threshold": 3.5}},
        {"name": "lines", "kind": "jsonl", "path": "data/*.jsonl.gz", "batch_size": 1000,
         "max_record_bytes": 1 << 20, "max_decompressed_bytes": 1 << 40, "fields": FIELDS},
        {"name": "api", "kind": "api", "url": "http://127.0.0.1:9/items", "schedule": "1h",
         "pagination": {"style": "page", "page_param": "page", "first_page": 1,
                        "page_size": 50, "max_pages": 100},
         "incremental": {"param": "since", "field": "updated_at", "lag_seconds": 60.0},
         "items_path": "items",
         "retry": {"attempts": 3, "backoff": 0.5, "max_backoff": 30.0,
                   "max_retry_after": 300.0},
         "timeouts": {"connect": 10.0, "read": 30.0, "total": 120.0},
         "rate_limit": 5.0, "max_response_bytes": 1 << 20, "fields": FIELDS},
        {"name": "feeds", "kind": "rss", "urls": ["http://127.0.0.1:9/feed.xml"],
         "schedule": "*/5 * * * *", "max_concurrency": 4,
         "fields": {"source_id": "id", "title": "title"}},
        {"name": "table", "kind": "sql", "url": "postgresql://reader@127.0.0.1:5432/shop",
         "table": "public.orders", "cursor": "updated_at", "batch_size": 5000,
         "max_boundary_keys": 1000, "fields": FIELDS},
        {"name": "events", "kind": "stream", "servers": ["nats://127.0.0.1:4222"],
         "stream": "EVENTS", "subject": "events.>", "batch_size": 1000,
         "max_batch_wait": 0.5, "connect_timeout_s": 5.0, "fields": FIELDS},
        {"name": "changes", "kind": "pg_cdc", "url": "postgresql://cdc@127.0.0.1:5432/shop",
         "password_env": "CDC_PASSWORD", "tables": ["orders", "billing.invoices"],
         "slot": "etlsvc_changes", "batch_size": 5000, "changes_per_read": 100_000,
         "poll_interval_s": 0.5, "max_retained_wal": "10GB", "reconnect_timeout_s": 60.0,
         "fields": FIELDS},
        {"name": "binlog", "kind": "mysql_cdc", "url": "mysql://cdc@127.0.0.1:3306/shop",
         "password_env": "CDC_PASSWORD", "tables": ["orders", "billing.invoices"],
         "server_id": 4242, "batch_size": 5000, "poll_interval_s": 0.5,
         "reconnect_timeout_s": 60.0, "fields": FIELDS},
    ],
}

#: What each value is replaced with: other types, bounds, emptiness, sizes TOML can write.
MUTATIONS: list[Any] = [
    "", " ", "x", "\x00", "é" * 300, 0, -1, 1, 2**63 - 1, 99999999999999999999, 0.0, -0.5,
    1e308, math.inf, -math.inf, math.nan, True, [], [""], {}, {"x": 1},
]


def leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path of the document, tables and arrays included."""
    if path:
        yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, (*path, i))


def mutated(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(FULL)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def key_name(path: tuple[Any, ...]) -> str:
    """The key as the error names it: ``sources[2].retry.attempts``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


#: The keys where an empty string means something (the embedded server, TLS as the URL
#: says, the body is the list); anywhere else it is a mistake.
EMPTY_MEANS_DEFAULT = {"database.url", "database.sslmode", "database.sslrootcert",
                       "sources[2].items_path"}


def started(cfg: Config) -> None:
    """What the service computes from the config before it touches anything."""
    for src in cfg.sources:
        if src.schedule:
            assert 1 <= schedule_seconds(src.schedule) <= 366 * 86400
            assert tick_window(src.schedule) > 0


def sensible(path: tuple[Any, ...], value: Any) -> str | None:
    """Why accepting ``value`` at ``path`` is a mistake, if it is one."""
    if value == "" and key_name(path) not in EMPTY_MEANS_DEFAULT:
        return "an empty string"
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if number and abs(value) > 2**31 and path[-2:-1] != ("amount",):   # a rule's bound
        return "a number no deployment means"
    return None


def test_the_full_config_is_valid(tmp_path: Path) -> None:
    started(decode_config(copy.deepcopy(FULL), tmp_path / "config.toml", environ={}))


PATHS = list(leaves(FULL))


@pytest.mark.parametrize("path", PATHS, ids=key_name)
def test_no_mutation_of_a_key_reaches_a_traceback(tmp_path: Path, path: tuple[Any, ...]) -> None:
    config = tmp_path / "config.toml"
    escaped = []
    for value in MUTATIONS:
        try:
            started(decode_config(mutated(path, value), config, environ={}))
            if mistake := sensible(path, value):
                escaped.append(f"{value!r}: accepted, but it is {mistake}")
        except ConfigError as exc:
            text = str(exc)
            assert "\n" not in text and text.startswith(f"{config}: "), text
        except Exception as exc:
            escaped.append(f"{value!r}: {type(exc).__name__}: {exc}")
    assert not escaped, f"{key_name(path)}:\n" + "\n".join(escaped)
