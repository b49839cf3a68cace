"""The event loop's worst stall (``/stats`` ``event_loop_worst_lag_ms_1min``, the
``etlsvc_event_loop_lag_seconds`` histogram) is the stall that happened, not a guess."""

from __future__ import annotations

import asyncio
import time

from etlsvc.runtime.service import LoopMonitor


async def test_a_blocked_loop_shows_as_its_stall_and_a_free_one_does_not() -> None:
    monitor = LoopMonitor(interval=0.01)
    monitor.start()
    try:
        await asyncio.sleep(0.2)
        assert monitor.worst_ms() < 150          # nothing blocked it yet
        time.sleep(0.3)                         # a handler that blocks the loop
        await asyncio.sleep(0.05)
        assert 250 <= monitor.worst_ms() < 2000
        # It is the worst of the window: older stalls leave it.
        assert monitor.worst_ms(window=0.02) < 150
    finally:
        monitor.stop()
