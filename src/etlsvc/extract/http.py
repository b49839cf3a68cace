"""HTTP for the kinds fetched over it (``api``, ``rss``): the config they share, and GET
requests with timeouts, retries, a rate limit and a size cap.

Retries (exponential backoff with jitter) cover connection errors, timeouts, 5xx and 429;
``Retry-After`` is honoured in seconds or as a date, up to ``max_retry_after``. A response
larger than ``max_response_bytes`` fails the request, declared or not.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

import httpx
import msgspec
import structlog

from etlsvc.contract import ByteLimit, Delay, SourceConfig, Timeout
from etlsvc.errors import ConfigError, SourceError, describe

log = structlog.get_logger()

_RETRY_STATUS = {429, 500, 502, 503, 504}


class Auth(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A secret header; the secret itself comes from the environment variable ``env``."""

    type: Literal["bearer", "header", "basic"]
    env: str
    header: str = "Authorization"     # for type "header", e.g. "X-API-Key"
    username: str | None = None       # for type "basic"; the password comes from ``env``


class Retry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Retries of a request on connection errors, timeouts, 5xx and 429."""

    attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    backoff: Delay = 0.5      # first delay, doubled each time
    max_backoff: Delay = 30.0
    #: A Retry-After longer than this fails the request instead of sleeping.
    max_retry_after: Delay = 300.0


class Timeouts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Seconds: to connect, between bytes read, and for a whole request with its body."""

    connect: Timeout = 10.0
    read: Timeout = 30.0
    total: Timeout = 120.0


class HttpSource(SourceConfig, kw_only=True):
    """What sources fetched over HTTP have."""

    headers: dict[str, str] = {}      # noqa: RUF012 - msgspec copies mutable defaults
    auth: Auth | None = None
    retry: Retry = Retry()
    timeouts: Timeouts = Timeouts()
    #: Requests per second at most (None: no limit).
    rate_limit: Annotated[float, msgspec.Meta(gt=0, le=1e6)] | None = None
    max_response_bytes: ByteLimit = 64 << 20


def check_url(src: HttpSource, where: str, url: str, key: str) -> None:
    """ConfigError unless ``url`` is http(s) and the auth is complete."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"{where}.{key}': expected an http(s) URL, got {url!r}")
    if src.auth and src.auth.type == "basic" and not src.auth.username:
        raise ConfigError(f"{where}.auth.username': basic auth needs a username")


def http_client(src: HttpSource) -> httpx.AsyncClient:
    """The HTTP client of one run of an HTTP source, with the source's timeouts."""
    t = src.timeouts
    return httpx.AsyncClient(timeout=httpx.Timeout(t.total, connect=t.connect, read=t.read),
                             follow_redirects=True)


class Fetcher:
    """GET requests of one source, with its timeouts, retries, rate limit and size cap."""

    def __init__(self, src: HttpSource, client: httpx.AsyncClient,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.src = src
        self.client = client
        self.sleep = sleep
        self._next_slot = 0.0

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", **self.src.headers}
        auth = self.src.auth
        if auth:
            secret = os.environ.get(auth.env)
            if not secret:
                raise SourceError(self.src.name, f"environment variable {auth.env} (the "
                                  "secret of this source's auth) is not set")
            if auth.type == "bearer":
                headers["Authorization"] = f"Bearer {secret}"
            elif auth.type == "basic":
                token = base64.b64encode(f"{auth.username}:{secret}".encode()).decode()
                headers["Authorization"] = f"Basic {token}"
            else:
                headers[auth.header] = secret
        return headers

    async def _wait_for_slot(self) -> None:
        if self.src.rate_limit is None:
            return
        now = time.monotonic()
        start = max(now, self._next_slot)
        self._next_slot = start + 1.0 / self.src.rate_limit
        if start > now:
            await self.sleep(start - now)

    async def get(self, url: str, params: dict[str, str],
                  headers: dict[str, str] | None = None) -> tuple[httpx.Response, bytes]:
        """GET ``url``; retry what is worth retrying; SourceError when it cannot succeed."""
        retry = self.src.retry
        headers = {**self._headers(), **(headers or {})}
        problem = ""
        for attempt in range(1, retry.attempts + 1):
            await self._wait_for_slot()
            delay = None
            try:
                async with asyncio.timeout(self.src.timeouts.total):
                    response, body = await self._get_once(url, params, headers)
            except (httpx.TooManyRedirects, httpx.UnsupportedProtocol, httpx.DecodingError,
                    httpx.InvalidURL) as exc:             # retrying cannot help
                raise SourceError(self.src.name, f"GET {url}: {describe(exc)}") from exc
            except (httpx.TransportError, TimeoutError) as exc:
                problem = describe(exc)
            else:
                if response.status_code not in _RETRY_STATUS:
                    if response.is_error:
                        raise SourceError(self.src.name, f"GET {response.url}: HTTP "
                                          f"{response.status_code}{_snippet(body)}")
                    return response, body
                problem = f"HTTP {response.status_code}"
                delay = _retry_after(response.headers.get("retry-after"))
                if delay is not None and delay > retry.max_retry_after:
                    raise SourceError(self.src.name, f"GET {url}: {problem} with Retry-After "
                                      f"{delay:.0f} s, more than max_retry_after")
            if attempt == retry.attempts:
                break
            if delay is None:
                backoff = min(retry.max_backoff, retry.backoff * 2 ** (attempt - 1))
                delay = backoff * (0.5 + random.random() / 2)       # jitter: 50-100 %
            log.warning("request failed, retrying", url=url, problem=problem, attempt=attempt,
                        delay_s=round(delay, 3))
            await self.sleep(delay)
        raise SourceError(self.src.name, f"GET {url}: {problem} after {retry.attempts} attempts")

    async def _get_once(self, url: str, params: dict[str, str],
                        headers: dict[str, str]) -> tuple[httpx.Response, bytes]:
        limit = self.src.max_response_bytes
        # Merged, not replaced: httpx drops a URL's own query when given params.
        target = httpx.URL(url).copy_merge_params(params) if params else httpx.URL(url)
        async with self.client.stream("GET", target, headers=headers) as response:
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise SourceError(self.src.name, f"GET {url}: response of {declared} bytes is "
                                  f"larger than max_response_bytes ({limit})")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise SourceError(self.src.name, f"GET {url}: response larger than "
                                      f"max_response_bytes ({limit})")
                chunks.append(chunk)
        return response, b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _snippet(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return f": {text}" if text else ""


async def check_urls(src: HttpSource, requests: list[tuple[str, dict[str, str]]]) -> str:
    """``etlsvc check`` of an HTTP source: one GET of each request, no retries."""
    once = msgspec.structs.replace(src, retry=msgspec.structs.replace(src.retry, attempts=1))
    answers = []
    async with httpx.AsyncClient(timeout=src.timeouts.connect) as client:
        for url, params in requests:
            response, _ = await Fetcher(once, client).get(url, params)
            answers.append(f"GET {response.url}: HTTP {response.status_code}")
    return "; ".join(answers)
