"""Data-quality rules declared per field: every rule rejects what it should, names itself,
the field, the column and the value, and a bad rule is a config error naming its key."""

from __future__ import annotations

import asyncpg
import pytest

from etlsvc.errors import ConfigError
from tests.conftest import Env, csv_source, run_source

FIELDS = """source_id = "id"
title = "title"
category = "category"
amount = "amount"
url = "url"
tags = "tags"
event_time = "created_at"
"""

RULES = """
[sources.rules.source_id]
regex = "^SKU-[0-9]+$"
[sources.rules.title]
required = true
min_length = 3
max_length = 20
[sources.rules.category]
type = "enum"
allowed = ["books", "toys"]
[sources.rules.amount]
required = true
min = 0
max = 1000
[sources.rules.url]
type = "url"
unique = true
[sources.rules.tags]
max_length = 2
allowed = ["new", "sale", "gift"]
[sources.rules.event_time]
min = 2020-01-01T00:00:00Z
max = "2030-01-01T00:00:00Z"
"""

HEADER = "id,title,category,amount,url,tags,created_at\n"
GOOD = "SKU-{n},Item {n},books,{n},https://shop.example/{n},new;sale,2024-05-01T12:00:00Z\n"

#: A row breaking one rule each: (line, rule, field, column, value).
BAD = [
    ("ABC-1,Item x,books,1,https://shop.example/a,new,2024-05-01T12:00:00Z",
     "regex", "source_id", "id", "ABC-1"),
    ("SKU-901,,books,1,https://shop.example/b,new,2024-05-01T12:00:00Z",
     "required", "title", "title", ""),
    ("SKU-902,It,books,1,https://shop.example/c,new,2024-05-01T12:00:00Z",
     "min_length", "title", "title", "It"),
    ("SKU-903,An item with a far too long title,books,1,https://shop.example/d,new,"
     "2024-05-01T12:00:00Z",
     "max_length", "title", "title", "An item with a far too long title"),
    ("SKU-904,Item y,garden,1,https://shop.example/e,new,2024-05-01T12:00:00Z",
     "allowed", "category", "category", "garden"),
    ("SKU-905,Item z,books,-5,https://shop.example/f,new,2024-05-01T12:00:00Z",
     "min", "amount", "amount", "-5"),
    ("SKU-906,Item w,books,5000,https://shop.example/g,new,2024-05-01T12:00:00Z",
     "max", "amount", "amount", "5000"),
    ("SKU-907,Item v,books,,https://shop.example/h,new,2024-05-01T12:00:00Z",
     "required", "amount", "amount", ""),
    ("SKU-908,Item u,books,1,ftp://shop.example/i,new,2024-05-01T12:00:00Z",
     "type", "url", "url", "ftp://shop.example/i"),
    ("SKU-909,Item t,books,1,https://shop.example/j,new;sale;gift,2024-05-01T12:00:00Z",
     "max_length", "tags", "tags", "new;sale;gift"),
    ("SKU-910,Item s,books,1,https://shop.example/k,new;cheap,2024-05-01T12:00:00Z",
     "allowed", "tags", "tags", "new;cheap"),
    ("SKU-911,Item r,books,1,https://shop.example/l,new,2019-12-31T23:59:59Z",
     "min", "event_time", "created_at", "2019-12-31T23:59:59Z"),
    ("SKU-912,Item q,books,1,https://shop.example/m,new,2031-01-01T00:00:00+02:00",
     "max", "event_time", "created_at", "2031-01-01T00:00:00+02:00"),
    ("SKU-913,Item p,books,1,https://shop.example/3,new,2024-05-01T12:00:00Z",
     "unique", "url", "url", "https://shop.example/3"),
]


async def test_each_rule_rejects_naming_rule_field_column_and_value(
        env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "items.csv"
    good = [GOOD.format(n=n) for n in range(1, 51)]
    path.write_text(HEADER + "".join(good[:25]) + "\n".join(b[0] for b in BAD) + "\n"
                    + "".join(good[25:]))
    cfg = env.config(csv_source("items", path, fields=FIELDS, extra="max_error_rate = 0.5")
                     + RULES)
    run = await run_source(cfg, "items")
    assert run["status"] == "succeeded", run["error"]
    assert (run["rows_read"], run["rows_valid"], run["rows_rejected"]) == (64, 50, 14)

    rejects = await pool.fetch(
        "SELECT rule, field, source_field, value, reason, record, status FROM etl_rejects "
        "ORDER BY (position->>'line')::int")
    got = [(r["rule"], r["field"], r["source_field"], r["value"]) for r in rejects]
    assert got == [b[1:] for b in BAD]
    for r, b in zip(rejects, BAD):
        assert r["status"] == "open"
        assert r["reason"].startswith(f"{b[2]} (column {b[3]!r}) "), r["reason"]
        assert repr(b[4]) in r["reason"]
        assert r["record"]["id"] == b[0].split(",")[0]        # the original record
    loaded = await pool.fetch("SELECT source_id FROM normalized_data")
    assert {r["source_id"] for r in loaded} == {f"SKU-{n}" for n in range(1, 51)}
    # A unique reject is not in the raw table (no reject is), the first key's row is.
    raw = await pool.fetchval("SELECT count(*) FROM raw_csv_data WHERE source_key = 'SKU-913'")
    assert raw == 0


async def test_unique_holds_across_batches_and_runs_and_lets_a_key_keep_its_value(
        env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "items.csv"
    rows = [GOOD.format(n=n) for n in range(1, 201)]
    path.write_text(HEADER + "".join(rows))
    rules = '[sources.rules.url]\nunique = true\n'
    cfg = env.config(csv_source("items", path, fields=FIELDS,
                                extra="batch_size = 50\nmax_error_rate = 0.5") + rules)
    assert (await run_source(cfg, "items"))["rows_inserted"] == 200
    # The same keys again (their own values), a new key with a taken value, and two new
    # keys sharing a new value in one file, in batches that commit concurrently.
    extra = [
        "SKU-1,Item one,books,2,https://shop.example/1,new,2024-05-01T12:00:00Z\n",
        "SKU-500,Item 500,books,1,https://shop.example/7,new,2024-05-01T12:00:00Z\n",
        *[GOOD.format(n=n) for n in range(300, 400)],
        "SKU-501,Item 501,books,1,https://shop.example/new,new,2024-05-01T12:00:00Z\n",
        "SKU-502,Item 502,books,1,https://shop.example/new,new,2024-05-01T12:00:00Z\n",
    ]
    with open(path, "a") as f:
        f.writelines(extra)
    run = await run_source(cfg, "items")
    assert run["status"] == "succeeded", run["error"]
    assert (run["rows_read"], run["rows_rejected"], run["rows_updated"]) == (104, 2, 1)
    rejects = await pool.fetch("SELECT rule, value, record->>'id' AS id FROM etl_rejects "
                               "ORDER BY id")
    assert [(r["rule"], r["id"], r["value"]) for r in rejects] == [
        ("unique", "SKU-500", "https://shop.example/7"),
        ("unique", "SKU-502", "https://shop.example/new")]
    dupes = await pool.fetchval("SELECT count(*) FROM (SELECT url FROM normalized_data "
                                "GROUP BY url HAVING count(*) > 1) d")
    assert dupes == 0


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ('[sources.rules.amount]\ntype = "text"',
         r"sources\[0\]\.rules\.amount\.type': amount is stored as numeric and cannot be of "
         r"type 'text'"),
        ('[sources.rules.title]\nregex = "("',
         r"sources\[0\]\.rules\.title\.regex': not a valid regular expression"),
        ('[sources.rules.amount]\nmin = 10\nmax = 1',
         r"sources\[0\]\.rules\.amount\.min': min \(10.0\) is above max \(1.0\)"),
        ('[sources.rules.category]\ntype = "enum"',
         r"sources\[0\]\.rules\.category\.allowed': an enum field needs its allowed values"),
        ('[sources.rules.description]\nrequired = true',
         r"sources\[0\]\.rules\.description': the field has rules but is not mapped"),
        ('[sources.rules.price]\nrequired = true',
         r"sources\[0\]\.rules\.price': unknown normalized field"),
        ('[sources.rules.title]\nmaximum = 3',
         r"unknown key 'sources\[0\]\.rules\.title\.maximum'"),
        ('[sources.rules.title]\nmin = 3',
         r"sources\[0\]\.rules\.title\.min': min and max apply to numbers and timestamps"),
        ('[sources.rules.event_time]\nmin = 3',
         r"sources\[0\]\.rules\.event_time\.min': a timestamp field needs a date-time here"),
        ('[sources.rules.amount]\nunique = true',
         r"sources\[0\]\.rules\.amount\.unique': unique applies to text fields"),
    ],
)
def test_a_bad_rule_is_a_config_error_naming_its_key(env: Env, rules: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        env.config(csv_source("items", env.dir / "x.csv", fields=FIELDS) + rules)


def test_a_bad_rule_exits_2_from_the_cli(env: Env) -> None:
    env.write_config(csv_source("items", env.dir / "x.csv", fields=FIELDS)
                     + '[sources.rules.title]\nregex = "["\n')
    done = env.cli("check")
    assert done.returncode == 2
    assert "rules.title.regex': not a valid regular expression" in done.stderr
