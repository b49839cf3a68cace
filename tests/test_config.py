"""Configuration: the fixed outer contract and one clear message (exit 2) for each mistake."""

from __future__ import annotations

import pytest

from etlsvc.config import config_path, load_config
from etlsvc.errors import ConfigError
from tests.conftest import Env, csv_source

GOOD = csv_source("products", "data.csv")


def test_good_config_decodes_with_defaults(env: Env) -> None:
    cfg = env.config(GOOD)
    src = cfg.source("products")
    assert src.kind == "csv"
    assert src.batch_size == 10_000 and src.max_error_rate == 0.05
    assert src.fields.source_id == "id" and src.fields.event_time == "created_at"
    assert cfg.resolve(src.path) == env.dir / "data.csv"


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        # unknown key in a source
        (
            lambda s: s.replace('kind = "csv"', 'kind = "csv"\nbatchsize = 10'),
            "unknown key 'sources[0].batchsize'",
        ),
        # wrong type
        (
            lambda s: s.replace('kind = "csv"', 'kind = "csv"\nbatch_size = "big"'),
            "key 'sources[0].batch_size': Expected `int`, got `str`",
        ),
        # mapping to a field that is not a normalized field
        (
            lambda s: s.replace('title = "title"', 'headline = "title"'),
            "unknown key 'sources[0].fields.headline' (normalized fields are: source_id, title",
        ),
        # missing required key
        (lambda s: s.replace('path = "data.csv"', ""), "missing required key 'sources[0].path'"),
        # a kind that does not exist
        (lambda s: s.replace('kind = "csv"', 'kind = "ftp"'), "key 'sources[0].kind'"),
    ],
)
def test_bad_config_exits_2_naming_key_and_file(env: Env, mutation, expected: str) -> None:
    path = env.write_config(mutation(GOOD))
    result = env.cli("check")
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(env: Env) -> None:
    result = env.cli("run")  # no config.toml written
    assert result.returncode == 2
    assert f"{env.dir / 'config.toml'}: config file not found" in result.stderr


def test_unknown_source_name_exits_2(env: Env) -> None:
    path = env.write_config(GOOD)
    result = env.cli("run", "nosuch")
    assert result.returncode == 2
    assert "unknown source 'nosuch' (configured sources: products)" in result.stderr
    assert str(path) not in result.stdout


def test_bad_usage_exits_2(env: Env) -> None:
    env.write_config(GOOD)
    assert env.cli("run", "--no-such-flag").returncode == 2


def test_config_path_precedence(tmp_path) -> None:
    assert str(config_path("a.toml", {"ETLSVC_CONFIG": "b.toml"})) == "a.toml"
    assert str(config_path(None, {"ETLSVC_CONFIG": "b.toml"})) == "b.toml"
    assert str(config_path(None, {})) == "config.toml"


def test_environment_overrides_database_url(env: Env) -> None:
    path = env.write_config(GOOD)
    cfg = load_config(
        path, {"ETLSVC_DATABASE_URL": "postgresql://x@y/z", "ETLSVC_LOG_LEVEL": "debug"}
    )
    assert cfg.database.url == "postgresql://x@y/z"
    assert cfg.log.level == "debug"
    with pytest.raises(ConfigError, match=r"log\.level"):
        load_config(path, {"ETLSVC_LOG_LEVEL": "loud"})


def test_duplicate_source_names_and_missing_key_mapping(env: Env) -> None:
    with pytest.raises(ConfigError, match="duplicate source name 'products'"):
        env.config(GOOD + GOOD)
    with pytest.raises(ConfigError, match=r"sources\[0\].fields.source_id"):
        env.config(GOOD.replace('source_id = "id"', ""))


@pytest.mark.parametrize(("url", "expected"), [
    ("notaurl", "not a PostgreSQL URL ('notaurl')"),
    ("mysql://etl:hunter2@db/x", "not a PostgreSQL URL ('mysql://etl:***@db/x')"),
    ("postgresql://etl@db:fivefour/x", "Port could not be cast to integer value"),
    ("postgresql://etl@db:99999/x", "Port out of range"),
])
def test_a_malformed_database_url_exits_2_in_one_line_naming_the_key(
    env: Env, url: str, expected: str
) -> None:
    env.write_config(GOOD)
    result = env.cli("check", ETLSVC_DATABASE_URL=url)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert "key 'database.url' (or ETLSVC_DATABASE_URL)" in line and expected in line, line
    assert "hunter2" not in line
