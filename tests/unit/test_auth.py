"""API keys with scopes: read, run, admin; public reads or not; 401 and 403 as before."""

from __future__ import annotations

import pytest

from etlsvc.api.auth import parse_keys
from etlsvc.errors import ConfigError

KEYS = "grafana:read:r-secret, ci:run:w-secret, ops:admin:a-secret, legacy-secret"


def test_scopes_nest_and_malformed_entries_are_config_errors() -> None:
    keys = {k.name: k for k in parse_keys(KEYS)}
    assert keys["grafana"].grants("read") and not keys["grafana"].grants("run")
    assert keys["ci"].grants("read") and keys["ci"].grants("run")
    assert not keys["ci"].grants("admin") and keys["ops"].grants("admin")
    assert keys["key4"].grants("admin") and keys["key4"].secret == b"legacy-secret"
    assert parse_keys("x:read:a:b:c")[0].secret == b"a:b:c"      # a secret may hold colons
    for bad in ("x:write:secret", "x:read:", ":read:secret", "x:read"):
        with pytest.raises(ConfigError, match="NAME:SCOPES:SECRET"):
            parse_keys(bad)
