"""API keys with scopes: who may read, start runs, or watch the logs.

Owns parsing ``ETLSVC_API_KEYS`` and deciding whether a request's bearer key grants a scope.
Each comma-separated entry is ``NAME:SCOPES:SECRET`` (scopes joined by ``+``), or
``NAME@TENANT:SCOPES:SECRET`` for a key of a tenant other than ``default``, or a bare
``SECRET`` (all scopes, as before scopes existed). Scopes nest: ``admin`` grants ``run``,
``run`` grants ``read``; every scope is within the key's tenant. Secrets are compared in
constant time and never logged; a key's name is what logs show. Keys made at run time
(``etlsvc keys``, ``/admin/keys``) are checked after these (``runtime/keys.py``).
"""

from __future__ import annotations

import hmac
import os
import re
from functools import cache

from etlsvc.contract import DEFAULT_TENANT, NAME_PATTERN
from etlsvc.errors import ConfigError
from etlsvc.runtime.keys import SCOPES, ApiKey, KeyStore

_TENANT = re.compile(NAME_PATTERN)


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
        name, at, tenant = name.partition("@")
        scopes, sep, secret = rest.partition(":")
        wanted = scopes.split("+")
        if not (name and sep and secret) or not set(wanted) <= set(SCOPES) or (
                at and not _TENANT.match(tenant)):
            raise ConfigError(
                f"ETLSVC_API_KEYS entry {i + 1} ({name or '?'}): expected NAME:SCOPES:SECRET "
                f"or NAME@TENANT:SCOPES:SECRET with scopes among {'+'.join(SCOPES)} (or a "
                "bare secret for every scope)")
        keys.append(ApiKey(name, max(wanted, key=SCOPES.index), secret.encode(),
                           tenant if at else DEFAULT_TENANT))
    return tuple(keys)


def configured_keys() -> tuple[ApiKey, ...]:
    """The keys of this process (``ETLSVC_API_KEYS``)."""
    return parse_keys(os.environ.get("ETLSVC_API_KEYS", ""))


def find(given: str, store: KeyStore | None = None) -> ApiKey | None:
    """The key whose secret is ``given``: one of ``ETLSVC_API_KEYS`` (every one compared,
    in constant time), else a live key of ``store`` (made at run time)."""
    found = None
    for key in configured_keys():
        if hmac.compare_digest(given.encode(), key.secret):
            found = key
    if found is None and store is not None:
        found = store.find(given)
    return found
