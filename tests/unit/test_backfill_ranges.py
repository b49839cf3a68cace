"""What a backfill's range is for each kind, checked before anything runs; how far one is;
and the source versions rows carry (a cursor value, a 64-bit xid)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import msgspec
import pytest

from etlsvc.config import Source
from etlsvc.errors import BackfillError
from etlsvc.extract import KINDS, files, json_api, kind_of
from etlsvc.extract.pg_cdc import widen
from etlsvc.extract.sql_tables import NO_VERSION, fraction, version_of


def source(kind: str, **settings: object) -> Source:
    return msgspec.convert({"name": "s", "kind": kind, "fields": {"source_id": "id"},
                            **settings}, Source)


def test_every_kind_says_what_its_range_is_or_that_it_has_none() -> None:
    assert {k for k, kind in KINDS.items() if kind.backfill_range} == {
        "csv", "jsonl", "api", "sql", "pg_cdc", "mysql_cdc"}
    assert KINDS["rss"].backfill_range is None and KINDS["stream"].backfill_range is None


@pytest.mark.parametrize(("kind", "settings", "start", "end", "message"), [
    ("sql", {"url": "postgresql://u@h/db", "table": "t"}, "2024-05-02", "2024-05-01",
     "--from 2024-05-02 is after --to 2024-05-01"),
    ("sql", {"url": "postgresql://u@h/db", "table": "t"}, "10", "9", "after --to 9"),
    ("csv", {"path": "x.csv"}, "2024-05-03", "2024-05-01", "after --to"),
    ("csv", {"path": "x.csv"}, "yesterday", None, "--from/--to: "),
    ("api", {"url": "http://h/"}, "0", None, "not a range of pages"),
    ("api", {"url": "http://h/"}, "2", "1", "not a range of pages"),
    ("api", {"url": "http://h/"}, "two", None, "are page numbers"),
])
def test_a_range_that_is_not_one_is_refused(kind: str, settings: dict[str, object],
                                            start: str | None, end: str | None,
                                            message: str) -> None:
    src = source(kind, **settings)
    with pytest.raises(BackfillError, match=message) as caught:
        kind_of(src).check_backfill(src, None, start, end)
    assert caught.value.code == "bad_range"


def test_a_range_of_text_or_open_ends_is_left_to_the_database() -> None:
    src = source("sql", url="postgresql://u@h/db", table="t", cursor="code")
    assert kind_of(src).check_backfill(src, None, "b", "a") is None    # text: its collation
    assert kind_of(src).check_backfill(src, None, None, "9") is None
    with pytest.raises(BackfillError, match="takes no table"):
        kind_of(src).check_backfill(src, "t", None, None)


def test_a_change_source_backfills_one_table_named_or_its_only_one() -> None:
    one = source("pg_cdc", url="postgresql://u@h/db", tables=["items"])
    assert kind_of(one).check_backfill(one, None, "1", "9") == "public.items"
    two = source("pg_cdc", url="postgresql://u@h/db", tables=["items", "sales.orders"])
    assert kind_of(two).check_backfill(two, "sales.orders", None, None) == "sales.orders"
    with pytest.raises(BackfillError, match="several tables: name one with --table"):
        kind_of(two).check_backfill(two, None, None, None)
    with pytest.raises(BackfillError, match=r"does not capture table public\.other"):
        kind_of(two).check_backfill(two, "other", None, None)
    mysql = source("mysql_cdc", url="mysql://u@h/shop", tables=["items"])
    assert kind_of(mysql).check_backfill(mysql, "items", None, None) == "shop.items"


def test_file_dates_cover_whole_days_and_times_are_exact() -> None:
    day = dt.datetime(2024, 5, 2, tzinfo=dt.UTC).timestamp()
    assert files.modified_window("2024-05-02", "2024-05-02") == (day, day + 86400)
    low, high = files.modified_window("2024-05-02T06:00:00+02:00", None)
    assert (low, high) == (day + 4 * 3600, None)
    assert files.modified_window(None, "2024-05-02T00:00:00")[1] == pytest.approx(day)


def test_progress_is_the_place_in_a_range_of_numbers_or_times() -> None:
    assert fraction("100", "200", 150) == 0.5
    assert fraction("2024-05-01", "2024-05-03", "2024-05-02T00:00:00+00:00") == 0.5
    assert fraction("2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z",
                    dt.datetime(2024, 5, 1, 6, tzinfo=dt.UTC)) == 0.25
    assert fraction("a", "z", "m") is None and fraction(None, "9", 5) is None
    assert fraction("1", "9", 20) == 1.0


def test_an_api_walk_starts_at_a_page_where_its_style_can_ask_for_one() -> None:
    paged = source("api", url="http://h/", pagination={"style": "page", "page_size": 10,
                                                        "first_page": 0})
    state = json_api._skip_to(paged, json_api.first_request(paged, None), 3)
    assert state["page"] == 2 and state["request"]["params"]["page"] == "2"
    offset = source("api", url="http://h/", pagination={"style": "offset", "page_size": 25})
    state = json_api._skip_to(offset, json_api.first_request(offset, None), 3)
    assert state["request"]["params"]["offset"] == "50"
    linked = source("api", url="http://h/", pagination={"style": "next_url"})
    first = json_api.first_request(linked, None)
    assert json_api._skip_to(linked, first, 3) == first          # walked from page 1


def test_source_versions_of_cursor_values_and_transaction_ids() -> None:
    assert version_of(42) == 42 and version_of(True) == NO_VERSION
    assert version_of(dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=dt.UTC)) == 1_000_000
    assert version_of(dt.datetime(1970, 1, 1, 0, 0, 1)) == 1_000_000    # naive: UTC
    assert version_of(dt.date(1970, 1, 2)) == 86_400_000_000
    assert version_of("2024-05-01") == NO_VERSION and version_of(Decimal(1)) == NO_VERSION
    assert version_of(1 << 63) == NO_VERSION
    # pgoutput sends 32 bits of an xid: the 64-bit one is the nearest to the source's next.
    assert widen(5, (7 << 32) + 10) == (7 << 32) + 5
    assert widen(0xFFFFFFF0, (7 << 32) + 10) == (6 << 32) + 0xFFFFFFF0     # before the wrap
