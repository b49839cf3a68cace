"""The unit layer: no database, no subprocess, no server — it runs in seconds
(``pytest tests/unit -n0``). A test here that asks for the database or starts a process
fails at once, so the layer stays what it says."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

#: Fixtures of tests/conftest.py that reach a database or start a server.
_OUT_OF_LAYER = {"env", "pool", "database_url", "server_dsn", "upstream", "json_server",
                 "json_server_bin", "gen_csv"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/unit/" in item.nodeid and (used := _OUT_OF_LAYER & set(
                getattr(item, "fixturenames", ()))):
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)}: it belongs in "
                                    "tests/integration/")


@pytest.fixture(autouse=True)
def _no_subprocess(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a unit test started a process: it belongs in "
                             "tests/integration/")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield
