"""Kind ``stream``: continuous ingestion from a NATS JetStream stream, exactly once.

* ``etlsvc serve`` runs a stream source as a long-lived run, not on a schedule (one replica
  at a time: the others wait for the source's lock). ``etlsvc run`` consumes what is pending
  and stops, which suits a backfill.
* Messages are pulled through a durable consumer (``etlsvc-<source>`` unless ``durable``
  is set) and gathered into batches of ``batch_size`` messages or ``max_batch_wait``
  seconds, whichever comes first. A batch commits in one transaction with the last stream
  sequence as the checkpoint; the messages are acknowledged only after that commit.
* PostgreSQL's checkpoint is the truth: when a run starts, the durable consumer is set to
  deliver from the sequence after it. A message at or below the checkpoint (redelivered
  after a crash, or delivered twice) is recognised by its stream sequence, acknowledged and
  not loaded: every message is in PostgreSQL exactly once.
* Each message's payload must be a JSON object; anything else is one reject with its
  sequence. ``raw_stream_data`` keeps the payload, the stream name and the sequence.
* The consumer's lag (messages not yet delivered plus delivered but not yet committed) is
  in ``/health`` and ``/metrics`` (``etlsvc_stream_lag_messages``).
* A server that cannot be reached for ``connect_timeout_s`` (at the start, or mid-stream
  while the client reconnects) fails the run with one line: ``run`` and ``check`` end there,
  and ``serve`` starts the source again with backoff, failing meanwhile in ``/health``. The
  connection's state changes are logged once each, not every reconnect attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
import structlog

from etlsvc import metrics
from etlsvc.contract import (
    BatchSize,
    Extraction,
    Fields,
    NonEmpty,
    Prepared,
    Preparing,
    Reject,
    SourceConfig,
    SourceKind,
)
from etlsvc.errors import ConfigError, SourceError, describe
from etlsvc.extract.records import json_batch

log = structlog.get_logger()

#: Seconds between lag readings while the stream is idle.
LAG_EVERY = 2.0


class StreamSource(SourceConfig, tag="stream", kw_only=True):
    """A NATS JetStream stream, consumed continuously."""

    servers: Annotated[list[NonEmpty], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["nats://127.0.0.1:4222"])
    #: The JetStream stream's name, and optionally a subject filter within it.
    stream: NonEmpty
    subject: NonEmpty | None = None
    #: The durable consumer's name (default ``etlsvc-<source name>``).
    durable: str | None = None
    #: Environment variables with the credentials: a token, or a user's password.
    token_env: str | None = None
    user: str | None = None
    password_env: str | None = None
    batch_size: BatchSize = 1000
    #: Seconds a batch waits to fill up before it is committed as it is.
    max_batch_wait: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5
    #: Seconds the server may be unreachable (at connect, or mid-stream) before the run fails.
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    fields: Fields

    kind = "stream"

    @property
    def consumer(self) -> str:
        return self.durable or f"etlsvc-{self.name}"


def _credentials(src: StreamSource) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, var in (("token", src.token_env), ("password", src.password_env)):
        if var:
            value = os.environ.get(var)
            if value is None:
                raise SourceError(src.name, f"environment variable {var} (the {key} of this "
                                  "source's NATS server) is not set")
            out[key] = value
    if src.user:
        out["user"] = src.user
    return out


class _Link:
    """A source's NATS connection: how it is doing, each change logged once (nats-py
    reports every failed attempt, every 2 s, to ``error_cb``)."""

    def __init__(self, src: StreamSource) -> None:
        self.src = src
        self.nc: Any = None
        self.last_error: BaseException | None = None
        self.lost_at: float | None = None

    async def connect(self, *, reconnect: bool) -> Any:
        """Connected within ``connect_timeout_s``, else SourceError. nats-py keeps trying a
        first connection for ever (even with ``max_reconnect_attempts = 0``): the time is
        bounded here."""
        import nats

        src = self.src
        try:
            async with asyncio.timeout(src.connect_timeout_s):
                self.nc = await nats.connect(
                    servers=src.servers, connect_timeout=min(src.connect_timeout_s, 5.0),
                    allow_reconnect=reconnect, max_reconnect_attempts=-1 if reconnect else 0,
                    error_cb=self._error, disconnected_cb=self._lost,
                    reconnected_cb=self._back, **_credentials(src))
        except SourceError:
            raise
        except Exception as exc:
            cause = self.last_error or exc
            raise SourceError(src.name, f"cannot reach NATS at {', '.join(src.servers)} "
                              f"within connect_timeout_s ({src.connect_timeout_s:g} s): "
                              f"{describe(cause)}") from None
        return self.nc

    def check(self) -> None:
        """SourceError once the connection has been lost for ``connect_timeout_s``."""
        if self.lost_at is not None and (
                time.monotonic() - self.lost_at > self.src.connect_timeout_s):
            cause = self.last_error
            raise SourceError(self.src.name, "NATS unreachable for more than "
                              f"connect_timeout_s ({self.src.connect_timeout_s:g} s)"
                              + (f": {describe(cause)}"
                                 if cause else ""))

    async def _error(self, exc: BaseException) -> None:
        self.last_error = exc            # said in the failure, if it comes to that

    async def _lost(self) -> None:
        if self.nc is not None and self.lost_at is None:
            self.lost_at = time.monotonic()
            log.warning("NATS connection lost; reconnecting", source=self.src.name)

    async def _back(self) -> None:
        if self.lost_at is not None:
            log.info("NATS connection back", source=self.src.name,
                     after_s=round(time.monotonic() - self.lost_at, 1))
        self.lost_at, self.last_error = None, None


def prepare_messages(preparer: Preparing, stream: str, payloads: list[bytes], seqs: list[int],
                     state: dict[str, Any]) -> Prepared:
    """In a worker: message payloads → records → a prepared batch."""
    items: list[Any] = []
    rejects: list[Reject] = []
    kept_raws, kept_seqs = [], []
    for payload, seq in zip(payloads, seqs):
        try:
            items.append(msgspec.json.decode(payload))
        except (msgspec.DecodeError, RecursionError) as exc:
            rejects.append(Reject(stream, {"seq": seq}, {"text": payload[:1000].decode(
                "utf-8", "backslashreplace")}, f"the message is not valid JSON: {exc}"))
            continue
        kept_raws.append(payload)
        kept_seqs.append(seq)
    batch = json_batch(preparer.src, stream, items, kept_raws, [(s,) for s in kept_seqs],
                       StreamKind.position_keys, rejects=rejects, state=state,
                       bytes_read=sum(map(len, payloads)))
    return preparer(batch)


class StreamKind(SourceKind):
    """A NATS JetStream stream; see the module docstring."""

    name = "stream"
    config = StreamSource
    raw_table = "raw_stream_data"
    stream_column = "stream"
    position_columns = ("stream_seq",)
    position_keys = ("seq",)
    continuous = True

    def check_config(self, src: StreamSource, where: str) -> None:
        if src.password_env and not src.user:
            raise ConfigError(f"{where}.user': password_env needs a user")
        for j, server in enumerate(src.servers):
            # As nats-py reads it: a bare host:port is nats://host:port.
            parts = urlsplit(server if "://" in server else f"nats://{server}")
            try:
                parts.port  # noqa: B018 - raises on a port that is not a number in range
            except ValueError as exc:
                raise ConfigError(f"{where}.servers[{j}]': {exc} in {server!r}") from None
            if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
                raise ConfigError(f"{where}.servers[{j}]': not a NATS server URL: {server!r} "
                                  "(expected nats://host:4222)")

    async def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        src: StreamSource = ex.src
        last = int((ex.checkpoints.get(src.stream) or {}).get("seq", 0))
        link = _Link(src)
        nc = await link.connect(reconnect=True)
        try:
            js = nc.jetstream()
            # The checkpoint is the truth: the consumer delivers from the message after it.
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(src.stream, src.consumer)
            inbox = _Inbox(src.batch_size)
            try:
                config = ConsumerConfig(
                    durable_name=src.consumer, filter_subject=src.subject,
                    deliver_subject=nc.new_inbox(),
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE if last else
                    DeliverPolicy.ALL, opt_start_seq=last + 1 if last else None,
                    # Unacknowledged messages bound what is pushed: two batches in flight
                    # (one committing, one prepared) and two arriving.
                    ack_policy=AckPolicy.ALL, ack_wait=600, max_ack_pending=4 * src.batch_size)
                await js.add_consumer(src.stream, config)
            except NotFoundError:
                raise SourceError(src.name, f"no JetStream stream {src.stream!r} on "
                                  f"{', '.join(src.servers)}") from None
            sub = await js.subscribe_bind(src.stream, config, src.consumer, cb=inbox.put,
                                          manual_ack=True)
            log.info("consuming", stream=src.stream, consumer=src.consumer, after_seq=last)
            async for prepared in self._consume(ex, src, link, sub, inbox, last):
                yield prepared
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _consume(self, ex: Extraction, src: StreamSource, link: _Link, sub: Any,
                       inbox: _Inbox, last: int) -> AsyncIterator[Prepared]:
        lag_read = 0.0
        while ex.stopping is None or not ex.stopping.is_set():
            msgs = await inbox.take(src.max_batch_wait)
            link.check()
            # While reconnecting there is no lag to read (the request would time out).
            if link.lost_at is None and (not msgs or time.monotonic() - lag_read > LAG_EVERY):
                try:
                    info = await sub.consumer_info()
                except Exception:
                    if link.lost_at is None:
                        raise
                    info = None               # lost meanwhile: link.check() decides
                if info is not None:
                    metrics.set_stream_lag(src.name, info.num_pending + info.num_ack_pending)
                    lag_read = time.monotonic()
                    if (not msgs and ex.stopping is None and not info.num_pending
                            and not inbox.msgs):
                        return                # `etlsvc run`: caught up
            if not msgs:
                continue
            seqs = list(map(_sequence, msgs))
            fresh = [i for i, seq in enumerate(seqs) if seq > last]
            if len(fresh) < len(msgs):
                log.info("messages at or below the checkpoint skipped",
                         count=len(msgs) - len(fresh), checkpoint_seq=last)
            if not fresh:
                await msgs[-1].ack()
                continue
            last = seqs[fresh[-1]]
            prepared = await ex.workers.run(
                prepare_messages, ex.preparer, src.stream, [msgs[i].data for i in fresh],
                [seqs[i] for i in fresh], {"seq": last})
            prepared.after_commit = msgs[-1].ack    # acknowledges every message up to it
            yield prepared

    async def check(self, src: StreamSource, base_dir: Path) -> str:
        nc = await _Link(src).connect(reconnect=False)
        try:
            info = await nc.jetstream().stream_info(src.stream)
        finally:
            await nc.close()
        return f"stream {src.stream}: {info.state.messages} messages"


class _Inbox:
    """Messages the consumer pushed, waiting to be taken in batches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.msgs: list[Any] = []
        self._full = asyncio.Event()

    async def put(self, msg: Any) -> None:
        self.msgs.append(msg)
        if len(self.msgs) >= self.size:
            self._full.set()

    async def take(self, wait: float) -> list[Any]:
        """Up to ``size`` messages: once that many are there, or after ``wait`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._full.wait(), wait)
        out, self.msgs = self.msgs[:self.size], self.msgs[self.size:]
        if len(self.msgs) < self.size:
            self._full.clear()
        return out


def _sequence(msg: Any) -> int:
    """The message's stream sequence, from its reply subject (``$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>…``, with a domain and account hash after ``ACK`` in the newer
    form); as ``msg.metadata`` reads it, without building the metadata object."""
    tokens = msg.reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


KIND = StreamKind()
