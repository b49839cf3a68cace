"""API keys with scopes: who may read, start runs, or watch the logs.

Owns parsing ``ETLSVC_API_KEYS`` and deciding whether a request's bearer key grants a scope.
Each comma-separated entry is ``NAME:SCOPES:SECRET`` (scopes joined by ``+``) or a bare
``SECRET`` (all scopes, as before scopes existed). Scopes nest: ``admin`` grants ``run``,
``run`` grants ``read``. Secrets are compared in constant time and never logged; a key's
name is what logs show.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from functools import cache

from etlsvc.errors import ConfigError

SCOPES = ("read", "run", "admin")


@dataclass(frozen=True)
class ApiKey:
    """One key: its name (for logs), the highest scope it grants, and its secret."""

    name: str
    scope: str
    secret: bytes

    def grants(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


@cache
def parse_keys(text: str) -> tuple[ApiKey, ...]:
    """The keys of an ``ETLSVC_API_KEYS`` value; ConfigError on a malformed entry."""
    keys = []
    for i, entry in enumerate(e.strip() for e in text.split(",")):
        if not entry:
            continue
        if ":" not in entry:
            keys.append(ApiKey(f"key{i + 1}", "admin", entry.encode()))
            continue
        name, _, rest = entry.partition(":")
        scopes, sep, secret = rest.partition(":")
        wanted = scopes.split("+")
        if not (name and sep and secret) or not set(wanted) <= set(SCOPES):
            raise ConfigError(
                f"ETLSVC_API_KEYS entry {i + 1} ({name or '?'}): expected NAME:SCOPES:SECRET "
                f"with scopes among {'+'.join(SCOPES)} (or a bare secret for every scope)")
        keys.append(ApiKey(name, max(wanted, key=SCOPES.index), secret.encode()))
    return tuple(keys)


def configured_keys() -> tuple[ApiKey, ...]:
    """The keys of this process (``ETLSVC_API_KEYS``)."""
    return parse_keys(os.environ.get("ETLSVC_API_KEYS", ""))


def find(given: str) -> ApiKey | None:
    """The key whose secret is ``given`` (every key is compared, in constant time)."""
    found = None
    for key in configured_keys():
        if hmac.compare_digest(given.encode(), key.secret):
            found = key
    return found
