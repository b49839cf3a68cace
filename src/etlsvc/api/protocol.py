"""The HTTP/1.1 protocol ``serve`` runs: uvicorn's h11 protocol with a deadline on a
request's head.

uvicorn arms a timer only between requests on a kept-alive connection, and cancels it as
soon as any byte arrives: a connection that never sends a request, or sends its headers a
byte at a time, stays open for ever, and enough of them exhaust the process's file
descriptors. Here every connection must deliver a whole request head within
``request_header_timeout_s`` of opening, and of each answer; else it is closed.
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineProtocol(H11Protocol):
    """H11Protocol, closing a connection whose request head takes too long."""

    header_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:         # a whole request head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()                          # before: a pipelined request disarms it
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:   # no request under way
            self.transport.close()


def with_header_timeout(seconds: float) -> type[DeadlineProtocol]:
    """The protocol class with ``seconds`` as its deadline."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"header_timeout": seconds})
