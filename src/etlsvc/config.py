"""Configuration: `config.toml` decoded into frozen msgspec structs, plus ``ETLSVC_*`` overrides.

Owns finding the file (``--config``, else ``ETLSVC_CONFIG``, else ``./config.toml``), decoding
and validating it, and turning every mistake into one :class:`~etlsvc.errors.ConfigError` that
names the file and the key. It does no I/O beyond reading that file.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from etlsvc.errors import ConfigError
from etlsvc.logs import redact

#: The columns of ``normalized_data`` a source can map its fields to.
NORMALIZED_FIELDS = (
    "source_id", "title", "description", "category", "amount", "url", "tags", "event_time",
)

SourceName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
OneChar = Annotated[str, msgspec.Meta(min_length=1, max_length=1)]


class Fields(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which source field feeds each normalized column (None: the column stays null)."""

    source_id: str | None = None
    title: str | None = None
    description: str | None = None
    category: str | None = None
    amount: str | None = None
    url: str | None = None
    tags: str | None = None
    event_time: str | None = None

    def mapped(self) -> dict[str, str]:
        """The normalized fields that are mapped, with their source field."""
        return {f: v for f in NORMALIZED_FIELDS if (v := getattr(self, f)) is not None}


class _Source(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True,
              tag_field="kind"):
    """What every source has."""

    name: SourceName
    schedule: str | None = None
    #: Share of rejected records above which a run fails.
    max_error_rate: Rate = 0.05
    #: Separator of the tags field when it is one string.
    tags_separator: str = ";"


class CsvSource(_Source, tag="csv"):
    """A CSV file, or every file matching a glob, read as a stream of records."""

    path: str
    fields: Fields
    batch_size: PositiveInt = 10_000
    encoding: str = "utf-8"
    delimiter: OneChar = ","
    quotechar: OneChar = '"'
    #: A longer record is one reject (its prefix, length and SHA-256 kept); a longer
    #: header fails the run.
    max_record_bytes: PositiveInt = 1 << 20
    #: A header with more columns fails the run.
    max_columns: PositiveInt = 10_000

    kind = "csv"


class Pagination(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How an API is paged.

    ``style``: ``none`` (one request); ``page`` (``page_param`` = 1, 2, …); ``offset``
    (``offset_param`` = 0, n, 2n, …); ``cursor`` (the next cursor is read from the body at
    ``cursor_path`` and sent as ``cursor_param``; the end is an empty cursor, or
    ``has_more_path`` false); ``next_url`` (the next page's URL is read from the body at
    ``next_url_path``); ``link_header`` (RFC 8288 ``Link: <…>; rel="next"``; with a
    ``page_size``, the first request also asks for page ``first_page``).
    """

    style: Literal["none", "page", "offset", "cursor", "next_url", "link_header"] = "none"
    page_size: PositiveInt | None = None
    size_param: str = "per_page"      # page style: page size parameter (limit_param for offset)
    page_param: str = "page"
    first_page: Annotated[int, msgspec.Meta(ge=0)] = 1
    offset_param: str = "offset"
    limit_param: str = "limit"
    cursor_param: str = "cursor"
    cursor_path: str = "next_cursor"
    has_more_path: str | None = None
    next_url_path: str = "next"
    #: A walk stops after this many pages (a guard against an API that never ends).
    max_pages: PositiveInt = 10_000


class Auth(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A secret header; the secret itself comes from the environment variable ``env``."""

    type: Literal["bearer", "header", "basic"]
    env: str
    header: str = "Authorization"     # for type "header", e.g. "X-API-Key"
    username: str | None = None       # for type "basic"; the password comes from ``env``


class Incremental(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Ask only for items changed since the last run (inclusive high-water mark)."""

    param: str                        # query parameter, e.g. "updated_since"
    field: str                        # dotted path of the item's change time, e.g. "updated_at"
    lag_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Keys seen exactly at the high-water mark, remembered so that the inclusive bound
    #: does not load them twice (at most this many).
    max_boundary_keys: PositiveInt = 10_000


class Retry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Retries of a request on connection errors, timeouts, 5xx and 429."""

    attempts: PositiveInt = 5
    backoff: Annotated[float, msgspec.Meta(ge=0)] = 0.5      # first delay, doubled each time
    max_backoff: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    #: A Retry-After longer than this fails the request instead of sleeping.
    max_retry_after: Annotated[float, msgspec.Meta(ge=0)] = 300.0


class Timeouts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Seconds: to connect, between bytes read, and for a whole request with its body."""

    connect: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    read: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    total: Annotated[float, msgspec.Meta(gt=0)] = 120.0


class _HttpSource(_Source, kw_only=True):
    """What sources fetched over HTTP have."""

    headers: dict[str, str] = {}
    auth: Auth | None = None
    retry: Retry = Retry()
    timeouts: Timeouts = Timeouts()
    #: Requests per second at most (None: no limit).
    rate_limit: Annotated[float, msgspec.Meta(gt=0)] | None = None
    max_response_bytes: PositiveInt = 64 << 20


class ApiSource(_HttpSource, tag="api"):
    """A paginated JSON HTTP API."""

    url: str
    fields: Fields
    #: Dotted path of the items' list in the body; "" when the body is the list.
    items_path: str = ""
    params: dict[str, str] = {}
    pagination: Pagination = Pagination()
    incremental: Incremental | None = None

    kind = "api"


#: What an RSS source maps by default: the entry's id (else link, else a hash), title,
#: summary, link, tag terms, and published (else updated) date.
RSS_FIELDS = Fields(source_id="etlsvc_key", title="title", description="summary", url="link",
                    tags="etlsvc_tags", event_time="etlsvc_time")


class RssSource(_HttpSource, tag="rss"):
    """One or more RSS/Atom feeds."""

    urls: Annotated[list[str], msgspec.Meta(min_length=1)]
    fields: Fields = RSS_FIELDS
    #: Feeds fetched at the same time at most.
    max_concurrency: PositiveInt = 8

    kind = "rss"


Source = CsvSource | ApiSource | RssSource


class DatabaseConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where PostgreSQL is; an empty ``url`` means the embedded server."""

    url: str = ""
    #: Optional URL of a read-only role for the read API (default: ``url``).
    read_url: str = ""
    min_pool_size: Annotated[int, msgspec.Meta(ge=0)] = 1
    max_pool_size: PositiveInt = 10
    connect_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    #: Seconds a run waits for a lost database to come back (reconnecting with backoff,
    #: then resuming from its last committed batch) before it fails.
    reconnect_timeout: Annotated[float, msgspec.Meta(ge=0)] = 60.0


class EmbeddedConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The embedded PostgreSQL used when no database URL is configured."""

    data_dir: str = ".etlsvc"
    pg_version: Literal[16, 18] = 18


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Log level and format (``auto``: JSON, or coloured text on a terminal)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`etlsvc serve`: where it listens (``--host``/``--port`` override) and its limits."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    #: Requests per minute per client address (0: no limit); /health and /metrics are
    #: not limited.
    rate_limit_per_minute: Annotated[int, msgspec.Meta(ge=0)] = 1200
    #: Longest a read query may run (ms) before it is cancelled with a 503.
    read_statement_timeout_ms: PositiveInt = 5000
    #: /health answers 503 while a source's last run failed (it always lists them).
    health_fails_on_failing_sources: bool = False
    #: Read endpoints answer without a key; off: they need a key with the ``read`` scope.
    public_read: bool = True
    #: Days the change feed keeps deletes (tombstones); a consumer that stays away longer
    #: gets 410 and reads the feed again from the beginning.
    change_feed_retention_days: Annotated[float, msgspec.Meta(gt=0)] = 7.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole configuration of one etlsvc process."""

    sources: list[Source] = []
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    log: LogConfig = LogConfig()
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
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a TOML document")
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in environ:
            data.setdefault(section, {})[key] = environ[var]
    data["base_dir"] = str(path.resolve().parent)
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_explain(exc, data)}") from exc
    _check(cfg, path)
    return cfg


def _explain(exc: msgspec.ValidationError, data: dict) -> str:
    """Turn msgspec's ``... - at `$.sources[0].fields``` into ``key sources[0].fields: ...``."""
    msg = str(exc)
    m = re.match(r"(?s)(.*) - at `\$\.?(.*)`$", msg)
    if not m:
        return msg
    text, where = m.groups()
    unknown = re.match(r"Object contains unknown field `(.*)`", text)
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
        return f"key {where!r}: {text} (supported kinds: csv, api, rss)"
    return f"key {where!r}: {text}"


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
    seen: set[str] = set()
    for i, src in enumerate(cfg.sources):
        where = f"{path}: key 'sources[{i}]"
        if src.name in seen:
            raise ConfigError(f"{where}.name': duplicate source name {src.name!r}")
        seen.add(src.name)
        if src.schedule:
            from etlsvc.runtime.service import parse_schedule  # apscheduler only when scheduling

            try:
                parse_schedule(src.schedule)
            except ConfigError as exc:
                raise ConfigError(f"{where}.schedule': {exc}") from None
        if src.fields.source_id is None:
            raise ConfigError(f"{where}.fields.source_id': every source needs its natural key "
                              "mapped")
        if isinstance(src, CsvSource):
            _check_csv(src, where)
        elif isinstance(src, ApiSource):
            _check_api(src, where, src.url, "url")
        else:
            for j, url in enumerate(src.urls):
                _check_api(src, where, url, f"urls[{j}]")
        typed = [v for f, v in src.fields.mapped().items()
                 if f in ("source_id", "amount", "event_time")]
        if len(typed) != len(set(typed)):
            raise ConfigError(f"{where}.fields': one column cannot feed two of source_id, "
                              "amount and event_time")


def _check_csv(src: CsvSource, where: str) -> None:
    try:
        codecs.lookup(src.encoding)
    except LookupError:
        raise ConfigError(f"{where}.encoding': unknown encoding {src.encoding!r}") from None
    if src.delimiter == src.quotechar:
        raise ConfigError(f"{where}.delimiter': delimiter and quotechar are the same")


def _check_api(src: ApiSource | RssSource, where: str, url: str, key: str) -> None:
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"{where}.{key}': expected an http(s) URL, got {url!r}")
    if src.auth and src.auth.type == "basic" and not src.auth.username:
        raise ConfigError(f"{where}.auth.username': basic auth needs a username")
