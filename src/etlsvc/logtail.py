"""Reading etlsvc's JSON log stream: filters, pretty printing, and live subscribers.

Owns ``etlsvc logs`` (read a JSON-lines stream from a file or stdin, optionally following
it, keep the events that match, print them as coloured text on a terminal) and the in-process
hub that ``GET /logs/stream`` and a run's ``GET /etl/runs/{id}/log`` read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import msgspec
import structlog

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


@dataclass(frozen=True)
class LogFilter:
    """Which events to keep: at least ``level``, and the given run id and source."""

    level: str = "debug"
    run_id: int | None = None
    source: str | None = None

    def __call__(self, event: dict[str, Any]) -> bool:
        level = LEVELS.get(str(event.get("level", "info")).lower(), 20)
        if level < LEVELS[self.level]:
            return False
        if self.run_id is not None and event.get("run_id") != self.run_id:
            return False
        return self.source is None or event.get("source") == self.source


def lines(stream: IO[str], follow: bool, poll: float = 0.2) -> Iterator[str]:
    """The lines of ``stream``; with ``follow``, wait for more at the end (like tail -f)."""
    while True:
        line = stream.readline()
        if line:
            yield line
        elif not follow:
            return
        else:
            time.sleep(poll)


def show(stream: IO[str], out: IO[str], keep: LogFilter, follow: bool = False) -> int:
    """Print the matching events of a JSON log stream; return how many were printed."""
    render = structlog.dev.ConsoleRenderer(colors=out.isatty())
    shown = 0
    for line in lines(stream, follow):
        try:
            event = msgspec.json.decode(line)
        except msgspec.DecodeError:
            event = None
        if not isinstance(event, dict):
            if keep == LogFilter():          # no filter: foreign lines pass through
                out.write(line)
            continue
        if keep(event):
            out.write(render(None, event.get("level", "info"), dict(event)) + "\n")
            out.flush()
            shown += 1
    return shown


class LogHub:
    """Live log events for subscribers (``GET /logs/stream``; slow ones lose events), and the
    last events of each recent run (``GET /etl/runs/{id}/log``), once ``attach``-ed."""

    #: Events kept per run, and runs kept.
    RUN_EVENTS = 500
    RUNS = 50

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runs: OrderedDict[int, deque[dict[str, Any]]] = OrderedDict()
        self._keep_runs = False

    def attach(self) -> None:
        """Keep the events of runs from now on (``serve``; a CLI run keeps nothing)."""
        self._loop = asyncio.get_running_loop()
        self._keep_runs = True

    def processor(self, _logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor: hand a copy of each event to the subscribers."""
        if self._loop and (self._subscribers or (self._keep_runs and "run_id" in event)):
            # Keys with a leading underscore are the logging machinery's, not the event's.
            copy = {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                    for k, v in event.items() if not k.startswith("_")}
            with contextlib.suppress(RuntimeError):       # the loop is closing
                self._loop.call_soon_threadsafe(self._publish, copy)
        return event

    def _publish(self, event: dict[str, Any]) -> None:
        run_id = event.get("run_id")
        if self._keep_runs and isinstance(run_id, int):
            if run_id not in self._runs:
                self._runs[run_id] = deque(maxlen=self.RUN_EVENTS)
                while len(self._runs) > self.RUNS:
                    self._runs.popitem(last=False)
            self._runs[run_id].append(event)
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    def history(self, run_id: int) -> list[dict[str, Any]]:
        """The kept events of a run of this process, oldest first."""
        return list(self._runs.get(run_id, ()))

    @contextlib.contextmanager
    def subscribe(self, size: int = 1000) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of the events logged from now on, while the context lasts."""
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=size)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)


HUB = LogHub()


def run_cli(path: str, follow: bool, keep: LogFilter) -> int:
    """``etlsvc logs``: 0 when something was printed or followed, 1 if nothing matched.

    A reader that goes away (``etlsvc logs - | head``) ends it quietly, with 0.
    """
    try:
        if path == "-":
            return 0 if show(sys.stdin, sys.stdout, keep, follow) or follow else 1
        with open(path, encoding="utf-8", errors="replace") as f:
            return 0 if show(f, sys.stdout, keep, follow) or follow else 1
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

