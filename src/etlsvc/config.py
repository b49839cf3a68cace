"""Configuration: `config.toml` decoded into frozen msgspec structs, plus ``ETLSVC_*`` overrides.

Owns finding the file (``--config``, else ``ETLSVC_CONFIG``, else ``./config.toml``), decoding
and validating it, and turning every mistake into one :class:`~etlsvc.errors.ConfigError` that
names the file and the key. It does no I/O beyond reading that file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

import msgspec

from etlsvc.contract import (
    NORMALIZED_FIELDS,
    Days,
    Delay,
    NonEmpty,
    NonNegative,
    Timeout,
)
from etlsvc.errors import ConfigError
from etlsvc.extract import KINDS, kind_of
from etlsvc.logs import redact
from etlsvc.schedule import parse_schedule
from etlsvc.transform.rules import compile_rules

#: One config struct per kind of source, tagged by ``kind`` (``extract/__init__.py``).
Source = Union[tuple(k.config for k in KINDS.values())]  # noqa: UP007 - built at run time

PoolSize = Annotated[int, msgspec.Meta(ge=0, le=1000)]


class DatabaseConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where PostgreSQL is; an empty ``url`` means the embedded server."""

    url: str = ""
    #: Optional URL of a read-only role for the read API (default: ``url``).
    read_url: str = ""
    min_pool_size: PoolSize = 1
    max_pool_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    connect_timeout: Timeout = 10.0
    #: Seconds a run waits for a lost database to come back (reconnecting with backoff,
    #: then resuming from its last committed batch) before it fails.
    reconnect_timeout: Delay = 60.0
    #: TLS to PostgreSQL, for both pools: ``verify-full`` (encrypted, the server's
    #: certificate signed by ``sslrootcert`` and naming the URL's host), ``verify-ca``,
    #: ``require`` (encrypted, unverified), ``disable``; empty: as the URL says (its own
    #: ``sslmode`` and ``sslrootcert`` parameters), else asyncpg's ``prefer``.
    sslmode: Literal["", "disable", "require", "verify-ca", "verify-full"] = ""
    #: The CA certificate(s) for ``verify-ca`` / ``verify-full`` (relative to this file).
    sslrootcert: str = ""


class EmbeddedConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The embedded PostgreSQL used when no database URL is configured."""

    data_dir: NonEmpty = ".etlsvc"
    pg_version: Literal[16, 18] = 18


class JwtConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[auth.jwt]``: bearer JWTs of an identity provider, accepted beside API keys
    (``api/tokens.py``). The signature is checked against the provider's JWKS (a file, or
    an http(s) URL read again every ``refresh_s`` and when a token names a key it lacks),
    then the issuer, the audience and the expiry; the tenant and scopes come from claims."""

    jwks: NonEmpty
    issuer: NonEmpty
    audience: NonEmpty
    #: The claim that names the tenant.
    tenant_claim: NonEmpty = "tenant"
    #: The claim that lists scopes (a space-separated string or a list); of those that are
    #: ``scope_prefix`` + read, run or admin, the highest counts.
    scope_claim: NonEmpty = "scope"
    scope_prefix: str = "etlsvc:"
    #: A claim listing the source globs the token is limited to (absent: none).
    sources_claim: NonEmpty | None = None
    algorithms: tuple[Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
                              "ES384", "ES512", "EdDSA"], ...] = ("RS256", "ES256")
    refresh_s: Annotated[float, msgspec.Meta(ge=10, le=86_400)] = 300
    #: Seconds of clock skew allowed on exp, nbf and iat.
    leeway_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 30


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[auth]``: how callers prove who they are, beyond ``ETLSVC_API_KEYS`` and the keys
    made at run time."""

    jwt: JwtConfig | None = None


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Log level and format (``auto``: JSON, or coloured text on a terminal)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`etlsvc serve`: where it listens (``--host``/``--port`` override) and its limits."""

    host: NonEmpty = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    #: Requests per minute per client address (0: no limit); /health and /metrics are
    #: not limited.
    rate_limit_per_minute: NonNegative = 1200
    #: Longest a read query may run (ms) before it is cancelled with a 503.
    read_statement_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 5000
    #: /health answers 503 while a source's last run failed (it always lists them).
    health_fails_on_failing_sources: bool = False
    #: Read endpoints answer without a key; off: they need a key with the ``read`` scope.
    public_read: bool = True
    #: Days the change feed keeps deletes (tombstones); a consumer that stays away longer
    #: gets 410 and reads the feed again from the beginning.
    change_feed_retention_days: Days = 7.0
    #: Seconds between maintenance passes (purging what sources' ``retention_days`` let go).
    maintenance_every_s: Annotated[float, msgspec.Meta(ge=1, le=7 * 86_400)] = 3600.0
    #: Seconds running runs get at SIGTERM to finish (each batch commits or rolls back
    #: whole) before they are cancelled and marked interrupted; keep it below the
    #: orchestrator's kill timeout (compose's stop_grace_period, Kubernetes'
    #: terminationGracePeriodSeconds).
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 20.0
    #: Seconds a connection may take to send a request's head (line and headers), from
    #: when it opens or its last answer was sent; then it is closed (idle and slowloris
    #: connections would otherwise stay open for ever). Keep-alive idle time is 5 s.
    request_header_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    #: Seconds a request may take to begin its answer (waiting for a pooled connection and
    #: the query included); then 503 with Retry-After. Streams, once begun, are not cut.
    request_deadline_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 6.0


class PipelineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How runs use the machine."""

    #: Worker processes for parsing, validation and COPY encoding (0: one per core, up to 4).
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    #: How much lower than etlsvc's the workers' CPU priority is (``nice``): when the API
    #: and a load both want the CPU, the API goes first.
    worker_niceness: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    #: Batches of one run committing at once, each on its own database connection (a big
    #: file keeps its next batch in flight; commits stay in file order).
    connections_per_run: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2
    #: Streams of one source read at once (the files of a glob).
    parallel_streams: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    #: Sources `etlsvc run` runs at once (`serve` runs each source as its schedule says).
    parallel_runs: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4


#: What a webhook can be told of (runtime/notify.py).
Event = Literal["run_failed", "anomaly", "drift", "stale"]
EVENTS: tuple[str, ...] = Event.__args__  # type: ignore[attr-defined]


class Webhook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[[notify.webhooks]]``: where events go."""

    url: str
    #: The events sent (default: all).
    events: tuple[Event, ...] = EVENTS  # type: ignore[assignment]
    #: Only these sources' events (default: all).
    sources: tuple[str, ...] = ()
    format: Literal["generic", "slack"] = "generic"
    #: Environment variable holding the HMAC secret (no signature without one).
    secret_env: str | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 5
    backoff_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 1.0


class NotifyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[notify]``."""

    webhooks: list[Webhook] = []


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole configuration of one etlsvc process."""

    sources: list[Source] = []
    pipeline: PipelineConfig = PipelineConfig()
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    log: LogConfig = LogConfig()
    notify: NotifyConfig = NotifyConfig()
    auth: AuthConfig = AuthConfig()
    #: Directory of the config file: relative paths in it are relative to this.
    base_dir: str = "."

    def source(self, name: str) -> Source:
        """The source called ``name``; a ConfigError naming the known ones otherwise."""
        for src in self.sources:
            if src.name == name:
                return src
        known = ", ".join(s.name for s in self.sources) or "none"
        raise ConfigError(f"unknown source {name!r} (configured sources: {known})")

    def resolve(self, path: str) -> Path:
        """A path from the config, made absolute relative to the config file."""
        return (Path(self.base_dir) / path).resolve()

    @property
    def embedded_dir(self) -> Path:
        """Data directory of the embedded PostgreSQL."""
        return self.resolve(self.embedded.data_dir) / f"pg{self.embedded.pg_version}"


#: Environment variables that override a config key, and the key they override.
ENV_OVERRIDES = {
    "ETLSVC_DATABASE_URL": ("database", "url"),
    "ETLSVC_READ_DATABASE_URL": ("database", "read_url"),
    "ETLSVC_LOG_LEVEL": ("log", "level"),
    "ETLSVC_LOG_FORMAT": ("log", "format"),
    "ETLSVC_DATA_DIR": ("embedded", "data_dir"),
    "ETLSVC_HOST": ("server", "host"),
    "ETLSVC_PORT": ("server", "port"),
}


#: Shipped in the package: the CSV sample, for an installation with no config of its own.
PACKAGED_CONFIG = Path(__file__).resolve().parent / "default_config.toml"


def config_path(cli_path: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The config file: ``--config``, else ``$ETLSVC_CONFIG``, else ``./config.toml``, else
    (when there is none) the packaged default."""
    chosen = cli_path or environ.get("ETLSVC_CONFIG")
    if chosen:
        return Path(chosen)
    local = Path("config.toml")
    return local if local.exists() or not PACKAGED_CONFIG.exists() else PACKAGED_CONFIG


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read, decode and check the config file; ConfigError (naming file and key) on any problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (use --config PATH or "
                          "ETLSVC_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    try:
        data = msgspec.toml.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return decode_config(data, path, environ)


def decode_config(data: object, path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """The checked Config of a decoded TOML document ``data`` read from ``path`` (its
    folder is the base of relative paths); ConfigError, naming the key, on any problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a TOML document")
    data = dict(data)
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in environ:
            value = environ[var]
            # A port is a number; anything else fails the check below, naming the key.
            table = data.setdefault(section, {})
            if isinstance(table, dict):     # else the check below names the section
                data[section] = {**table, key: int(value) if key == "port" and
                                 value.strip().isdigit() else value}
    data["base_dir"] = str(path.resolve().parent)
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_explain(exc, data)}") from exc
    _check(cfg, path)
    _check_notify(cfg.notify, f"{path}: key 'notify", environ)
    return cfg


def _explain(exc: msgspec.ValidationError, data: dict) -> str:
    """Turn msgspec's ``... - at `$.sources[0].fields``` into ``key sources[0].fields: ...``."""
    msg = str(exc)
    m = re.match(r"(?s)(.*) - at `\$\.?(.*)`$", msg)
    if not m:
        return msg
    text, where = m.groups()
    unknown = re.match(r"Object contains unknown field `(.*)`", text)
    if unknown and "[...]" in where:
        where = _name_dict_keys(data, where, unknown.group(1))
    if unknown:
        key = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        hint = ""
        if where.endswith(".fields"):
            hint = f" (normalized fields are: {', '.join(NORMALIZED_FIELDS)})"
        return f"unknown key {key!r}{hint}"
    missing = re.match(r"Object missing required field `(.*)`", text)
    if missing:
        key = f"{where}.{missing.group(1)}" if where else missing.group(1)
        return f"missing required key {key!r}"
    if "Invalid value" in text and where.endswith(".kind"):
        return f"key {where!r}: {text} (supported kinds: " + ", ".join(KINDS) + ")"
    return f"key {where!r}: {text}"


def _name_dict_keys(data: dict, where: str, field: str) -> str:
    """msgspec writes a dict's key as ``[...]``: name the one whose table holds ``field``."""
    node: object = data
    out = []
    for part in re.findall(r"[^.\[]+|\[[^\]]*\]", where):
        if part == "[...]" and isinstance(node, dict):
            key = next((k for k, v in node.items() if isinstance(v, dict) and field in v), None)
            if key is None:
                return where
            part, node = f".{key}", node[key]
        elif part.startswith("["):
            node = node[int(part[1:-1])] if isinstance(node, list) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
            part = f".{part}" if out else part
        out.append(part)
    return "".join(out)


def _check_notify(cfg: NotifyConfig, where: str, environ: Mapping[str, str]) -> None:
    """ConfigError naming the key for a webhook that cannot work."""
    for i, hook in enumerate(cfg.webhooks):
        if not hook.url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.webhooks[{i}].url': not an http(s) URL: {hook.url!r}")
        if hook.secret_env and not environ.get(hook.secret_env):
            raise ConfigError(f"{where}.webhooks[{i}].secret_env': environment variable "
                              f"{hook.secret_env} is not set (it holds the signing secret)")


def _check_database_url(path: Path, key: str, url: str) -> None:
    """A PostgreSQL URL asyncpg can use (``postgresql://user:pass@host:port/db?…``)."""
    if not url:
        return
    env = next(v for v, k in ENV_OVERRIDES.items() if k == ("database", key))
    where = f"{path}: key 'database.{key}' (or {env})"
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{where}: not a PostgreSQL URL ({redact(url)!r}); expected "
                          "postgresql://user:password@host:5432/database")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} in {redact(url)!r}") from None


def _check(cfg: Config, path: Path) -> None:
    """Checks msgspec's types cannot express."""
    _check_database_url(path, "url", cfg.database.url)
    _check_database_url(path, "read_url", cfg.database.read_url)
    if cfg.database.min_pool_size > cfg.database.max_pool_size:
        raise ConfigError(f"{path}: key 'database.min_pool_size' = "
                          f"{cfg.database.min_pool_size} is above 'database.max_pool_size' = "
                          f"{cfg.database.max_pool_size}")
    if cfg.database.sslmode.startswith("verify") and not cfg.database.sslrootcert:
        raise ConfigError(f"{path}: key 'database.sslmode' = {cfg.database.sslmode!r} needs "
                          "'database.sslrootcert': the CA certificate that signed the "
                          "server's certificate")
    seen: set[str] = set()
    for i, src in enumerate(cfg.sources):
        where = f"{path}: key 'sources[{i}]"
        if src.name in seen:
            raise ConfigError(f"{where}.name': duplicate source name {src.name!r}")
        seen.add(src.name)
        if src.schedule:
            if kind_of(src).continuous:
                raise ConfigError(f"{where}.schedule': a {src.kind} source runs continuously "
                                  "in `etlsvc serve`; it takes no schedule")
            try:
                parse_schedule(src.schedule)
            except ConfigError as exc:
                raise ConfigError(f"{where}.schedule': {exc}") from None
        if src.fields.source_id is None:
            raise ConfigError(f"{where}.fields.source_id': every source needs its natural key "
                              "mapped")
        kind_of(src).check_config(src, where)
        if src.deletes == "detect" and (why := kind_of(src).whole_read(src)):
            raise ConfigError(f"{where}.deletes': \"detect\" needs every key at each run, "
                              f"but {why}")
        checks = compile_rules(src.fields.mapped(), src.rules, src.tags_separator,
                               f"{where}.rules")
        checked = [v for f, v in src.fields.mapped().items() if not checks[f].trivial]
        if len(checked) != len(set(checked)):
            raise ConfigError(f"{where}.fields': one column cannot feed two fields that are "
                              "checked (source_id, amount, event_time, tags and fields with "
                              "rules)")
