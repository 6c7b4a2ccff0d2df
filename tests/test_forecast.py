"""Forecasts (statsforecast AutoETS) of a benchmark series: a last run in line with its history is
inside the 95 % interval, one far off is outside, and a short history is refused."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from dtf.projections.detection import Point
from dtf.projections.forecast import MIN_HISTORY, NotEnoughHistory, forecast

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def history(values: list[float]) -> list[Point]:
    return [Point(v, f"res{n}", f"run{n}", f"task{n}", T0 + timedelta(hours=n)) for n, v in enumerate(values)]


def noisy(runs: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [100 * (1 + rng.gauss(0, 0.02)) for _ in range(runs)]


def test_a_last_run_in_line_with_its_history_is_inside_the_interval():
    result = forecast(history(noisy(30)), horizon=3)
    last = result["last"]
    assert last["outside"] is False and last["lo"] < last["expected"] < last["hi"]
    assert last["run_id"] == "run29" and result["runs"] == 30 and result["level"] == 95
    assert [step["step"] for step in result["forecast"]] == [1, 2, 3]
    assert all(step["lo"] < step["mean"] < step["hi"] for step in result["forecast"])


def test_a_last_run_far_off_its_history_is_outside_the_interval():
    values = noisy(30)
    values[-1] *= 1.3
    last = forecast(history(values))["last"]
    assert last["outside"] is True and last["value"] > last["hi"]


def test_a_short_history_has_no_forecast():
    with pytest.raises(NotEnoughHistory, match=str(MIN_HISTORY + 1)):
        forecast(history(noisy(MIN_HISTORY)))
