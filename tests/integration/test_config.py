"""Configuration mistakes at the command line: exit 2 and one clear line, no traceback.

Each kind of mistake is checked in process by tests/unit/test_config.py; here each path to
the command line's exit 2 is taken once, in a real ``etlsvc`` process."""

from __future__ import annotations

from tests.conftest import Env, csv_source

GOOD = csv_source("products", "data.csv")


def test_a_bad_config_exits_2_naming_key_and_file(env: Env) -> None:
    path = env.write_config(GOOD.replace('kind = "csv"', 'kind = "csv"\nbatchsize = 10'))
    result = env.cli("check")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert str(path) in line and "unknown key 'sources[0].batchsize'" in line


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


def test_a_malformed_database_url_from_the_environment_exits_2_without_the_password(
        env: Env) -> None:
    env.write_config(GOOD)
    result = env.cli("check", ETLSVC_DATABASE_URL="mysql://etl:hunter2@db/x")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert "key 'database.url' (or ETLSVC_DATABASE_URL)" in line
    assert "not a PostgreSQL URL ('mysql://etl:***@db/x')" in line and "hunter2" not in line


def test_values_that_once_ended_in_a_traceback_exit_2_with_one_line(env: Env) -> None:
    """An interval too long for the scheduler (OverflowError) and a pool whose minimum is
    above its maximum (asyncpg's ValueError) are config mistakes like any other."""
    path = env.write_config(GOOD)
    pools = path.read_text().replace("[database]", "[database]\nmin_pool_size = 20\n"
                                     "max_pool_size = 5")
    for config, key in [
        (GOOD.replace('kind = "csv"', 'kind = "csv"\nschedule = "99999999999d"'),
         "key 'sources[0].schedule'"),
        (None, "key 'database.min_pool_size'"),
    ]:
        if config is None:
            path.write_text(pools)
        else:
            env.write_config(config)
        result = env.cli("run")
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert key in line, line
