"""Schedules: ``30s`` / ``5m`` / ``1h`` / ``1d`` or a 5-field cron expression, as APScheduler
triggers.

Owns reading a source's ``schedule`` (``config.py`` checks it with ``parse_schedule``;
``runtime/service.py`` schedules with it) and the arithmetic of ticks: a schedule's period,
and how long after a scheduled run another replica's tick still counts as the same tick.
"""

from __future__ import annotations

import datetime as dt
import re

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from etlsvc.errors import ConfigError

#: How late a scheduler tick may still run (a busy loop, a suspended process).
MISFIRE_GRACE_S = 60
_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ORIGIN = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
#: An interval schedule's bounds: more often than every second is not a schedule (a
#: stream source runs continuously instead), and a year covers every calendar need.
MIN_INTERVAL_S, MAX_INTERVAL_S = 1, 366 * 86400


def parse_schedule(text: str) -> CronTrigger | IntervalTrigger:
    """A trigger from ``30s`` / ``5m`` / ``1h`` / ``1d`` or a 5-field cron expression (UTC)."""
    m = _INTERVAL.match(text.strip())
    if m:
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
        if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
            raise ConfigError(f"schedule {text!r}: an interval is from 1s to 366d")
        # Aligned to a fixed origin, so that every replica ticks at the same instants: one of
        # them runs the source, the others find it locked and skip that tick.
        return IntervalTrigger(seconds=seconds, start_date=_ORIGIN, timezone="UTC")
    try:
        return CronTrigger.from_crontab(text, timezone="UTC")
    except ValueError as exc:
        raise ConfigError(f"schedule {text!r}: not an interval (30s, 5m, 1h, 1d) or a cron "
                          f"expression ({exc})") from exc


def schedule_seconds(text: str) -> float:
    """The period of a schedule: an interval's, or the gap between a cron's next two ticks."""
    trigger = parse_schedule(text)
    if isinstance(trigger, IntervalTrigger):
        return trigger.interval.total_seconds()
    now = dt.datetime.now(dt.UTC)
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first + dt.timedelta(seconds=1))
    return (second - first).total_seconds()


def tick_window(schedule: str) -> float:
    """How long after a scheduled run another replica's tick still counts as the same tick:
    half the period, at most a minute (the scheduler's misfire grace)."""
    return min(schedule_seconds(schedule) / 2, MISFIRE_GRACE_S)
