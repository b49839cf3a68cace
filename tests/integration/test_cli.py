"""The command line: progress on a terminal, plain logs otherwise, `check`, `migrate`."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from tests.conftest import Env, csv_source, log_events


def test_progress_bar_on_a_terminal_plain_logs_otherwise(env: Env, gen_csv) -> None:
    full, _ = gen_csv(20_000)
    env.write_config(csv_source("products", full, extra="batch_size = 2000"))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "run", "--config", str(env.dir / "config.toml")],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
        env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url},
    )
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.wait() == 0
    os.close(master)
    screen = terminal.decode(errors="replace")
    assert "products: 100%" in screen  # percent of bytes
    assert "rows=20,000" in screen and "rows_s=" in screen  # rows and rows/s
    assert "rejected=" in screen
    # stdout is not a terminal: JSON log lines only
    events = log_events(out)
    assert events and all(line.startswith("{") for line in out.splitlines() if line)

    # Not on a terminal at all: no bar, the summary table, JSON logs.
    result = env.cli("run", "--full-refresh")
    assert result.returncode == 0
    assert "%|" not in result.stderr and "rows in table" in result.stderr


def test_check_reports_each_problem(env: Env, gen_csv) -> None:
    full, _ = gen_csv(2_000)
    env.write_config(
        csv_source("good", full)
        + csv_source("missing", env.dir / "nope" / "*.csv")
        + csv_source("badmap", full, key="sku")
    )
    result = env.cli("check")
    assert result.returncode == 1
    err = result.stderr
    assert "ok   config: 3 source(s): good, missing, badmap" in err
    assert "ok   database: PostgreSQL" in err and "(configured URL)" in err
    assert "ok   source good: 1 file(s), mapped columns present" in err
    assert f"FAIL source 'missing': no file matches {env.dir / 'nope' / '*.csv'}" in err
    assert (
        "FAIL source 'badmap':" in err and "column 'sku' (for source_id) not in the header" in err
    )


def test_check_and_run_without_a_database_fail_clearly(env: Env, gen_csv) -> None:
    full, _ = gen_csv(2_000)
    env.write_config(csv_source("good", full))
    url = "postgresql://etl:hunter2@127.0.0.1:9/none"
    for command in ("check", "run"):
        result = env.cli(command, ETLSVC_DATABASE_URL=url)
        assert result.returncode == 1
        assert (
            "etlsvc: cannot connect to PostgreSQL at postgresql://etl:***@127.0.0.1:9/none"
            in result.stderr
        )
        assert "hunter2" not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr


def test_migrate_is_idempotent(env: Env) -> None:
    env.write_config("")
    result = env.cli("migrate")
    assert result.returncode == 0 and "database is up to date" in result.stderr


def test_config_is_accepted_before_or_after_the_command(env: Env) -> None:
    import subprocess
    import sys

    env.write_config("")
    for args in (["--config", str(env.dir / "config.toml"), "migrate"],
                 ["migrate", "--config", str(env.dir / "config.toml")]):
        done = subprocess.run([sys.executable, "-m", "etlsvc", *args], capture_output=True,
                              text=True, timeout=60, cwd="/",
                              env={"PATH": "/usr/bin:/bin",
                                   "ETLSVC_DATABASE_URL": env.database_url})
        assert done.returncode == 0, (args, done.stderr)


def test_a_file_split_on_another_delimiter_gets_a_hint(env: Env) -> None:
    path = env.dir / "semi.csv"
    path.write_text("id;title;amount\n1;a;2\n")
    env.write_config(csv_source("semi", path, fields='source_id = "id"\ntitle = "title"'))
    for command in ("run", "check"):
        result = env.cli(command, "semi") if command == "run" else env.cli(command)
        assert result.returncode == 1
        assert "the header splits on ';': set delimiter = ';' for this source" in result.stderr
