"""What ``as_of`` may name (a snapshot, a change token, a time), checked before any query;
and a rollback that would need a position the kind cannot move back, refused up front."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from etlsvc.api.versions import _parse_snapshot, _parse_time
from etlsvc.config import Source
from etlsvc.errors import RollbackError
from etlsvc.runtime import rollback


@pytest.mark.parametrize(("text", "xmin"), [
    ("3:3:", 3), ("100:105:100,102", 100), ("7:9:7,8", 7),
    (f"{2**63}:{2**63 + 4}:{2**63}", 2**63)])
def test_a_snapshot_as_postgresql_writes_one_is_a_moment(text: str, xmin: int) -> None:
    moment = _parse_snapshot(text)
    assert moment is not None and moment.snapshot == text and moment.xmin == xmin


@pytest.mark.parametrize("text", [
    "", "1:1:", "5:3:", "10:20:15", "10:20:10,10", "10:20:12,11", "10:20:10,20", "10:20:9",
    "a:b:", "10:20", "10:20:10,", f"{2**64}:{2**64}:", "10-20", " 10:20:"])
def test_anything_else_is_not_a_snapshot(text: str) -> None:
    assert _parse_snapshot(text) is None


def test_a_time_without_a_zone_is_utc_and_others_are_converted() -> None:
    assert _parse_time("2026-12-01T09:00:00") == dt.datetime(2026, 12, 1, 9, tzinfo=dt.UTC)
    assert _parse_time("2026-12-01T10:00:00+01:00") == dt.datetime(2026, 12, 1, 9,
                                                                   tzinfo=dt.UTC)
    assert _parse_time("2026-12-01") == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert _parse_time("yesterday") is None and _parse_time("9-") is None


async def test_a_pg_cdc_rollback_must_keep_its_position() -> None:
    src = msgspec.convert({"name": "orders", "kind": "pg_cdc", "url": "postgresql://x/y",
                           "tables": ["public.orders"], "fields": {"source_id": "id"}}, Source)
    with pytest.raises(RollbackError, match="replication slot cannot be moved back") as err:
        await rollback.rollback(None, src, 1)   # type: ignore[arg-type]  # refused first
    assert err.value.code == "no_rewind"
