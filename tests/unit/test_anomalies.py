"""Anomalies: a run unlike the source's recent runs is flagged (etl_runs, /health,
/metrics); normal noise raises no alarm."""

from __future__ import annotations

import random

from etlsvc.runtime.anomalies import score


def normal_run(rng: random.Random) -> dict[str, float]:
    rows = max(1, round(rng.gauss(10_000, 300)))
    return {"rows_read": rows, "rows_rejected": round(rows * max(0.0, rng.gauss(0.01, 0.002))),
            "seconds": max(0.1, rng.gauss(12.0, 1.0))}


def test_normal_noise_raises_no_alarm_over_hundreds_of_runs() -> None:
    rng = random.Random(20261130)
    runs = [normal_run(rng) for _ in range(520)]
    alarms = [i for i in range(20, len(runs)) if score(runs[i], runs[i - 20:i], 3.5)]
    assert alarms == []


def test_ten_times_fewer_rows_a_jump_in_rejects_and_a_slow_run_are_flagged() -> None:
    rng = random.Random(7)
    history = [normal_run(rng) for _ in range(20)]
    few = score({"rows_read": 1_000, "rows_rejected": 10, "seconds": 12.0}, history, 3.5)
    assert few is not None and list(few) == ["rows_read"]
    assert few["rows_read"]["score"] < -3.5 and few["rows_read"]["value"] == 1000
    rejects = score({"rows_read": 10_000, "rows_rejected": 800, "seconds": 12.0}, history, 3.5)
    assert rejects is not None and list(rejects) == ["reject_rate"]
    slow = score({"rows_read": 10_000, "rows_rejected": 100, "seconds": 60.0}, history, 3.5)
    assert slow is not None and list(slow) == ["duration_s"]
    # Faster than usual, or fewer rejects than usual, is no alarm.
    assert score({"rows_read": 10_000, "rows_rejected": 0, "seconds": 3.0}, history, 3.5) \
        is None


def test_a_history_of_identical_runs_tolerates_a_wobble_but_not_a_drop() -> None:
    history = [{"rows_read": 5000, "rows_rejected": 0, "seconds": 4.0}] * 10
    assert score({"rows_read": 5100, "rows_rejected": 5, "seconds": 4.2}, history, 3.5) is None
    assert score({"rows_read": 500, "rows_rejected": 0, "seconds": 4.0}, history, 3.5)
