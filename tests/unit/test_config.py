"""Configuration, in process: every mistake is one ConfigError naming the file and the key.

(That the command line turns it into exit 2 with one line, and no traceback, is checked
once per path in tests/integration/test_config.py.)"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from etlsvc.config import config_path, load_config
from etlsvc.errors import ConfigError
from tests.conftest import csv_source

GOOD = csv_source("products", "data.csv")


def write(tmp_path: Path, sources: str, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [database]
        url = "postgresql://etl@127.0.0.1:5432/etl"
        {textwrap.dedent(extra)}
        """) + textwrap.dedent(sources))
    return path


def test_good_config_decodes_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), environ={})
    src = cfg.source("products")
    assert src.kind == "csv"
    assert src.batch_size == 10_000 and src.max_error_rate == 0.05
    assert src.fields.source_id == "id" and src.fields.event_time == "created_at"
    assert cfg.resolve(src.path) == tmp_path / "data.csv"


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        # unknown key in a source
        (lambda s: s.replace('kind = "csv"', 'kind = "csv"\nbatchsize = 10'),
         "unknown key 'sources[0].batchsize'"),
        # wrong type
        (lambda s: s.replace('kind = "csv"', 'kind = "csv"\nbatch_size = "big"'),
         "key 'sources[0].batch_size': Expected `int`, got `str`"),
        # mapping to a field that is not a normalized field
        (lambda s: s.replace('title = "title"', 'headline = "title"'),
         "unknown key 'sources[0].fields.headline' (normalized fields are: source_id, title"),
        # missing required key
        (lambda s: s.replace('path = "data.csv"', ""), "missing required key 'sources[0].path'"),
        # a kind that does not exist
        (lambda s: s.replace('kind = "csv"', 'kind = "ftp"'), "key 'sources[0].kind'"),
        # a schedule that is neither an interval nor a cron expression
        (lambda s: s.replace('kind = "csv"', 'kind = "csv"\nschedule = "often"'),
         "schedule 'often': not an interval"),
        # numbers and strings no deployment means: each one line naming its key
        (lambda s: s.replace('kind = "csv"', 'kind = "csv"\nschedule = "99999999999d"'),
         "key 'sources[0].schedule': schedule '99999999999d': an interval is from 1s to 366d"),
        (lambda s: s.replace('kind = "csv"', 'kind = "csv"\nschedule = "0s"'),
         "key 'sources[0].schedule': schedule '0s': an interval is from 1s to 366d"),
        (lambda s: s.replace('path = "data.csv"', 'path = ""'),
         "key 'sources[0].path': Expected `str` of length >= 1"),
        (lambda s: s.replace('kind = "csv"', 'kind = "csv"\nbatch_size = 99999999999999999999'),
         "key 'sources[0].batch_size': Expected `int` <= 1000000"),
        (lambda s: s.replace('source_id = "id"', 'source_id = ""'),
         "key 'sources[0].fields.source_id': Expected `str` of length >= 1"),
        (lambda s: s.replace('kind = "csv"', 'kind = "csv"\nencoding = "utf\\u00008"'),
         "key 'sources[0].encoding': unknown encoding"),
        # a rule on a field that is not mapped
        (lambda s: s + '[sources.rules.category]\nrequired = true\n'.replace(
            "category", "nosuch"), "nosuch"),
    ],
)
def test_each_mistake_is_one_error_naming_the_key_and_the_file(
        tmp_path: Path, mutation, expected: str) -> None:
    path = write(tmp_path, mutation(GOOD))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert str(path) in message and expected in message, message
    assert "\n" not in message


def test_a_pool_whose_minimum_is_above_its_maximum_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, extra="min_pool_size = 20\nmax_pool_size = 5")
    with pytest.raises(ConfigError, match=r"key 'database.min_pool_size' = 20 is above "
                                          r"'database.max_pool_size' = 5"):
        load_config(path, environ={})


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"nowhere/config\.toml: config file not found"):
        load_config(Path("nowhere/config.toml"), environ={})


def test_config_path_precedence() -> None:
    assert str(config_path("a.toml", {"ETLSVC_CONFIG": "b.toml"})) == "a.toml"
    assert str(config_path(None, {"ETLSVC_CONFIG": "b.toml"})) == "b.toml"
    assert str(config_path(None, {})) == "config.toml"


def test_environment_overrides_database_url(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    cfg = load_config(
        path, {"ETLSVC_DATABASE_URL": "postgresql://x@y/z", "ETLSVC_LOG_LEVEL": "debug"})
    assert cfg.database.url == "postgresql://x@y/z"
    assert cfg.log.level == "debug"
    with pytest.raises(ConfigError, match=r"log\.level"):
        load_config(path, {"ETLSVC_LOG_LEVEL": "loud"})


def test_duplicate_source_names_and_missing_key_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate source name 'products'"):
        load_config(write(tmp_path, GOOD + GOOD), environ={})
    with pytest.raises(ConfigError, match=r"sources\[0\].fields.source_id"):
        load_config(write(tmp_path, GOOD.replace('source_id = "id"', "")), environ={})


@pytest.mark.parametrize(("url", "expected"), [
    ("notaurl", "not a PostgreSQL URL ('notaurl')"),
    ("mysql://etl:hunter2@db/x", "not a PostgreSQL URL ('mysql://etl:***@db/x')"),
    ("postgresql://etl@db:fivefour/x", "Port could not be cast to integer value"),
    ("postgresql://etl@db:99999/x", "Port out of range"),
])
def test_a_malformed_database_url_is_one_line_naming_the_key_without_the_password(
        tmp_path: Path, url: str, expected: str) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as err:
        load_config(path, {"ETLSVC_DATABASE_URL": url})
    line = str(err.value)
    assert "\n" not in line
    assert "key 'database.url' (or ETLSVC_DATABASE_URL)" in line and expected in line, line
    assert "hunter2" not in line


def change_source(kind: str, keys: str) -> str:
    return f"""
[[sources]]
name = "shop"
kind = "{kind}"
{keys}
[sources.fields]
source_id = "id"
"""


@pytest.mark.parametrize(("kind", "keys", "expected"), [
    ("pg_cdc", 'url = "postgresql://etl:secret@db/shop"\ntables = ["orders"]',
     "sources[0].url': no password in the config file"),
    ("pg_cdc", 'url_env = "U"', "sources[0].tables': set tables"),
    ("pg_cdc", 'url_env = "U"\ntables = ["orders"]\npublication = "p"',
     "sources[0].tables': set tables"),
    ("pg_cdc", 'url_env = "U"\ntables = ["orders"]\nschedule = "5m"',
     "sources[0].schedule': a pg_cdc source runs continuously"),
    ("pg_cdc", 'url_env = "U"\ntables = ["orders"]\nmax_retained_wal = "lots"',
     "sources[0].max_retained_wal': not a size"),
    ("pg_cdc", 'url_env = "U"\ntables = ["orders"]\nslot = "Etl-Slot"',
     "sources[0].slot': a slot name is 1-63 lower-case"),
    ("mysql_cdc", 'url = "mysql://etl:secret@db/shop"\ntables = ["orders"]',
     "sources[0].url': no password in the config file"),
    ("mysql_cdc", 'url = "postgresql://etl@db/shop"\ntables = ["orders"]',
     "sources[0].url': expected mysql://"),
    ("mysql_cdc", 'url = "mysql://etl@db"\ntables = ["orders"]',
     "sources[0].url': name the database in the URL"),
    ("mysql_cdc", 'url_env = "U"', "sources[0].tables': name the tables to capture"),
    ("mysql_cdc", 'url_env = "U"\ntables = ["orders; DROP"]',
     "sources[0].tables[0]': not a plain table name"),
    ("mysql_cdc", 'url_env = "U"\ntables = ["orders"]\nschedule = "5m"',
     "sources[0].schedule': a mysql_cdc source runs continuously"),
    ("mysql_cdc", 'url_env = "U"\ntables = ["orders"]\nserver_id = 0',
     "server_id"),
])
def test_a_change_source_mistake_is_one_error_naming_the_key(
        tmp_path: Path, kind: str, keys: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, change_source(kind, keys)), environ={})
    assert expected in str(caught.value) and "secret" not in str(caught.value)


@pytest.mark.parametrize(("source", "expected"), [
    ('kind = "sql"\nurl_env = "U"\ntable = "t"\ncursor = "updated_at"',
     "a sql source with a cursor reads only the rows past its mark"),
    ('kind = "api"\nurl = "http://127.0.0.1:9/x"\n[sources.incremental]\nparam = "since"\n'
     'field = "updated_at"', "an incremental API source reads only what changed"),
    ('kind = "rss"\nurls = ["http://127.0.0.1:9/feed.xml"]',
     "a rss source is not read whole at each run"),
    ('kind = "pg_cdc"\nurl_env = "U"\ntables = ["t"]', "a pg_cdc source is not read whole"),
])
def test_deletes_detect_is_refused_where_a_run_does_not_read_every_key(
        tmp_path: Path, source: str, expected: str) -> None:
    head, _, table = source.partition("\n[")
    text = f'[[sources]]\nname = "s"\n{head}\ndeletes = "detect"\n' + (
        f"[{table}\n" if table else "") + '[sources.fields]\nsource_id = "id"\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert "sources[0].deletes'" in str(caught.value) and expected in str(caught.value)


@pytest.mark.parametrize("source", [
    'kind = "sql"\nurl_env = "U"\ntable = "t"', 'kind = "jsonl"\npath = "x.jsonl"',
    'kind = "csv"\npath = "x.csv"', 'kind = "api"\nurl = "http://127.0.0.1:9/x"'])
def test_deletes_detect_is_taken_where_each_run_reads_every_key(
        tmp_path: Path, source: str) -> None:
    text = (f'[[sources]]\nname = "s"\n{source}\ndeletes = "detect"\n'
            'max_delete_fraction = 0.2\n[sources.fields]\nsource_id = "id"\n')
    src = load_config(write(tmp_path, text), environ={}).source("s")
    assert src.deletes == "detect" and src.max_delete_fraction == 0.2
