"""Forecasts of benchmark series with statsforecast's AutoETS: is the last run where the series said
it would be?

`SeriesHistory` collects every benchmark series' values from the event log, counting results exactly
as the detector does (`dtf.projections.detector.Results`, `dtf.projections.detection.points`), so a
series name from `dtf anomalies` is a name here, and each submitter's runs of a name are a series of
their own, as the detector keeps them. `forecast(values)` fits AutoETS on all but the last
value and asks whether the last one falls inside the `level` % prediction interval for it, then fits
on all of them for the next `horizon` runs. Both are CPU work for a worker thread (the CLI runs them
in one), never for an event loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from dtf import events as ev
from dtf.projections.detection import Point, points
from dtf.projections.detector import Results
from dtf.streams.bus import StoredMsg

MIN_HISTORY = 10
"""Values before the last one needed for a forecast: fewer and ETS has nothing to fit."""
LEVEL = 95


class SeriesHistory:
    """Every benchmark series' observations, in log order (test failure series are left out)."""

    def __init__(self) -> None:
        self.results = Results()
        self.series: dict[str, dict[str, list[Point]]] = {}
        """Series name -> owner (the submitter of its runs) -> the observations."""

    def apply(self, messages: Sequence[StoredMsg], tests: Mapping[str, list[ev.TestOutcome]]) -> None:
        for message in messages:
            _, counted = self.results.apply(message, tests)
            if counted is None:
                continue
            for key, failures, point in points(*counted):
                if not failures and math.isfinite(point.value):
                    self.series.setdefault(key.name, {}).setdefault(key.owner, []).append(point)


class NotEnoughHistory(ValueError):
    pass


def _ets(values: Sequence[float], horizon: int, level: int) -> list[dict]:
    import numpy as np
    from statsforecast.models import AutoETS

    found = AutoETS(season_length=1).forecast(y=np.asarray(values, dtype=float), h=horizon, level=[level])
    return [
        {"step": step + 1, "mean": float(found["mean"][step]), "lo": float(found[f"lo-{level}"][step]),
         "hi": float(found[f"hi-{level}"][step])}
        for step in range(horizon)
    ]


def forecast(history: Sequence[Point], horizon: int = 5, level: int = LEVEL) -> dict:
    """Whether the last observation is outside the `level` % interval forecast from the ones before
    it, and the forecast of the next `horizon` runs from all of them."""
    if len(history) < MIN_HISTORY + 1:
        raise NotEnoughHistory(f"{len(history)} runs; a forecast needs at least {MIN_HISTORY + 1}")
    values = [p.value for p in history]
    last = history[-1]
    (expected,) = _ets(values[:-1], 1, level)
    return {
        "model": "AutoETS", "level": level, "runs": len(values),
        "last": {
            "run_id": last.run_id, "task_id": last.task_id, "time": last.time.isoformat(), "value": last.value,
            "expected": expected["mean"], "lo": expected["lo"], "hi": expected["hi"],
            "outside": not expected["lo"] <= last.value <= expected["hi"],
        },
        "forecast": _ets(values, horizon, level),
    }
