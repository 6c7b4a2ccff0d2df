"""Online detection, pure: results in, RegressionDetected / AnomalyDetected out, the same every replay.

A series is one benchmark metric under one set of labels on one kind of hardware, named
`BENCHMARK:METRIC{k=v,...}@HARDWARE` (labels sorted, `{}` left out when there are none; hardware the
worker's kinds sorted and joined by "+", as `dtf results --group-by hardware` shows them; `@...` left
out when unknown), or one test's failure rate, `NODEID:failure_rate{...}@HARDWARE`, of one owner:
the submitter of the run whose result it is. Tenants' series are independent: two submitters running
the same benchmark with the same labels on the same hardware have two series of the same name, so
neither's results move the other's baseline, mask its regression or raise an anomaly in it. Each
keeps its own detectors:

* Level shifts: river's PageHinkley on the value standardized by a robust running scale (the median
  and MAD of the current regime's last `window` points, floored at `scale_floor` of the median so a
  near-constant series does not make noise look huge). River's defaults cannot find a 20 % step in
  ten runs: PageHinkley waits for 30 points and thresholds in raw units, so the settings here are in
  standard deviations (allowance `delta`, alarm `threshold`) after a short warm-up. Each standardized
  value is clipped to ±`clip`, so one wild value cannot cross the threshold alone. On an alarm, the
  change point is the split of the regime that best separates two means; before/after are the
  medians either side. A shift for the worse (by the metric's direction) of at least `min_effect`
  is a RegressionDetected; a shift of that size either way restarts the regime from the change
  point, a smaller one only restarts the detector. The MAD is corrected for the small samples of
  a young regime (n / (n - 0.8)). Tuned on bench/detection.py's series (0.5-4 % noise, seasonality,
  outliers; six seeds): delta 0.5, threshold 7 find 10 % steps with recall 0.96-1.0 and 20 % steps
  0.96-1.0, a median 3 runs after the step, with 1-4 % of series falsely alarmed (threshold 8: 0.94-0.98
  and 1-2 %).
* Single outliers: a value more than `outlier_z` robust deviations (and `outlier_min_effect`) from
  the median is held back; if
  the next value is back in line (within `clip` or half as far out) it was an outlier (AnomalyDetected, and it never enters the level
  statistics), otherwise it was the start of a shift and both go on to PageHinkley. River's
  HalfSpaceTrees was measured for this on one squashed feature and separates poorly (normal points
  score up to 0.96, outliers 0.97-0.98), so the robust score decides.
* Test failure rates: PageHinkley (mode "up") on 0/1 failures per test, so a test that starts failing
  regularly is flagged while an occasional flake is not.

Everything is a function of the input sequence (no clock, no randomness), so a rebuild from the log
detects exactly what the live detector did, with the same event ids. An id is
`<kind>-<hash of the series name>-<triggering result id>`: the owner is left out of the hash on
purpose. It is not needed to tell two owners' detections apart (a result is one task's, and a task
one owner's), and leaving it out keeps the ids of logs written before series were per owner: where
a tenant's own series finds what the shared one found, the detector recognizes the old event and
publishes nothing again.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from river import drift

from dtf import events as ev

Better = Literal["lower", "higher"]

HIGHER_IS_BETTER = (
    "throughput", "per_s", "per_sec", "_ps", "ops", "qps", "rps", "fps", "tps", "bandwidth", "speedup",
    "accuracy", "score", "hit_rate", "items_s", "samples_s", "tokens_s", "images_s", "gflops", "tflops",
)
"""Name fragments of metrics where more is better; every other metric (times, latencies, memory,
sizes, error rates) is lower-is-better unless overridden."""


def better_for(metric: str, overrides: dict[str, Better] | None = None) -> Better:
    """Which way is better for a metric: an override by exact name, else its name's look."""
    if overrides and metric in overrides:
        return overrides[metric]
    name = metric.lower().replace("/", "_per_")
    return "higher" if any(fragment in name for fragment in HIGHER_IS_BETTER) else "lower"


@dataclass(frozen=True)
class Settings:
    warmup: int = 5
    """Points in a regime before PageHinkley watches it."""
    window: int = 30
    """Points of the current regime kept for the robust scale and the change-point estimate."""
    delta: float = 0.5
    """PageHinkley allowance, in robust standard deviations."""
    threshold: float = 7.0
    """PageHinkley alarm level, in robust standard deviations."""
    clip: float = 3.0
    """Standardized values go to PageHinkley clipped to ±clip, so no single one crosses the threshold."""
    outlier_z: float = 6.0
    """Robust deviations from the median beyond which a value is held as a possible outlier."""
    outlier_min_effect: float = 0.1
    """Smallest relative deviation held as a possible outlier (a young regime's scale is uncertain)."""
    min_effect: float = 0.03
    """Smallest relative shift reported as a regression."""
    scale_floor: float = 0.01
    """The robust scale is at least this fraction of |median|."""
    failure_delta: float = 0.1
    failure_threshold: float = 2.0
    failure_warmup: int = 5
    better: dict[str, Better] = field(default_factory=dict)
    """Per-metric overrides of the direction (metric name -> "lower" | "higher")."""

    @property
    def shift_detector(self) -> str:
        return f"page-hinkley(delta={self.delta:g},threshold={self.threshold:g},warmup={self.warmup})"

    @property
    def outlier_detector(self) -> str:
        return f"robust-z(>{self.outlier_z:g},confirmed)"

    @property
    def failure_detector(self) -> str:
        return f"page-hinkley-failures(delta={self.failure_delta:g},threshold={self.failure_threshold:g})"


@dataclass(frozen=True)
class Point:
    """One observation: a value from one accepted ResultReported."""

    value: float
    result_id: str
    run_id: str
    task_id: str
    time: datetime
    """The result's time: a detection takes its triggering result's time, so replays agree."""


@dataclass(frozen=True)
class SeriesKey:
    benchmark: str
    metric: str
    labels: tuple[tuple[str, str], ...]
    hardware: tuple[str, ...]
    owner: str = ""
    """The submitter of the runs whose results the series holds ("" when unknown): part of the key,
    not of the name, so each tenant's series of a name are its own and are named as before."""

    @property
    def name(self) -> str:
        labels = ",".join(f"{k}={v}" for k, v in self.labels)
        return (f"{self.benchmark}:{self.metric}" + (f"{{{labels}}}" if labels else "")
                + (f"@{'+'.join(self.hardware)}" if self.hardware else ""))

    @property
    def token(self) -> str:
        """A short stable hash of the name, for event ids. Not of the owner: see the module docstring
        (ids stay unique, since the triggering result names the owner, and old logs keep theirs)."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _robust(values: list[float], floor: float) -> tuple[float, float]:
    """Median and a MAD-based standard deviation, at least `floor` * |median| (and never 0)."""
    median = statistics.median(values)
    n = len(values)
    # 1.4826 makes the MAD a standard deviation for normal noise; n / (n - 0.8) undoes most of its
    # downward bias in the small samples a young regime has.
    mad = statistics.median(abs(v - median) for v in values) * 1.4826 * n / (n - 0.8)
    return median, max(mad, floor * abs(median), 1e-12)


def _split(values: list[float]) -> tuple[int, float]:
    """Where `values` splits best into two runs with different means (the index of the first point
    after the change, leaving at least two after it: one point is an outlier's business) and the
    two-sample z statistic of that split, unit variance assumed."""
    n = len(values)
    total = sum(values)
    best, best_z, left = 1, 0.0, 0.0
    for k in range(1, n - 1):
        left += values[k - 1]
        mean_l, mean_r = left / k, (total - left) / (n - k)
        z = abs(mean_r - mean_l) * math.sqrt(k * (n - k) / n)
        if z > best_z:
            best, best_z = k, z
    return best, best_z


def _confidence(z: float) -> float:
    """Two-sided normal confidence for a z statistic, rounded so replays print alike."""
    return round(math.erf(abs(z) / math.sqrt(2)), 6)


def _page_hinkley(delta: float, threshold: float, mode: str = "both", warmup: int = 1) -> drift.PageHinkley:
    # min_instances=warmup (1 when the warm-up is ours: points before it never reach the detector);
    # alpha=1: no forgetting, the regime restarts at each change instead.
    return drift.PageHinkley(min_instances=warmup, delta=delta, threshold=threshold, alpha=1.0, mode=mode)


class _Series:
    """What both kinds of series share: a key, settings, and how a finding becomes an event."""

    def __init__(self, key: SeriesKey, settings: Settings, better: Better) -> None:
        self.key = key
        self.settings = settings
        self.better = better
        self.regime: deque[Point] = deque(maxlen=settings.window)

    def _event(self, cls: type[ev.Detection], kind: str, trigger: Point, size: float, z: float,
               detector: str, points: list[Point], **fields: float | str) -> list[ev.Detection]:
        """The event, or none when a number overflowed (values near the float limits): JSON has no
        inf or NaN, and no reader could use them."""
        numbers = [size, _confidence(z), *(v for v in fields.values() if isinstance(v, float))]
        if not all(math.isfinite(n) for n in numbers):
            return []
        return [cls(
            id=f"{kind}-{self.key.token}-{trigger.result_id}", time=trigger.time,
            run_id=trigger.run_id, task_id=trigger.task_id, series=self.key.name, owner=self.key.owner,
            benchmark=self.key.benchmark, metric=self.key.metric, labels=dict(self.key.labels),
            hardware=list(self.key.hardware), better=self.better, size=round(size, 6),
            confidence=_confidence(z), detector=detector, result_ids=[p.result_id for p in points],
            **fields,
        )]


class MetricSeries(_Series):
    """The detectors of one benchmark series."""

    def __init__(self, key: SeriesKey, settings: Settings) -> None:
        super().__init__(key, settings, better_for(key.metric, settings.better))
        self.held: Point | None = None
        """A value far out of line, waiting for the next one to say outlier or shift."""
        self.current: Point | None = None
        """The value being observed: a detection it completes is its result's."""
        self.detector = _page_hinkley(settings.delta, settings.threshold)

    def observe(self, point: Point) -> list[ev.Detection]:
        if not _finite(point.value):
            return []  # NaN or inf says nothing about the level (the read model still keeps it)
        if len(self.regime) < self.settings.warmup:
            self.regime.append(point)
            return []
        found: list[ev.Detection] = []
        self.current = point
        median, scale = self._scale()
        z = (point.value - median) / scale
        held, self.held = self.held, None
        if held is not None:
            held_z = (held.value - median) / scale
            # Back in line: within `clip`, nearer the median than half the held value's distance, or
            # on the other side. Otherwise the level moved with the held value.
            if abs(z) <= max(self.settings.clip, abs(held_z) / 2) or (z > 0) != (held_z > 0):
                found += self._anomaly(held, median, held_z)
            else:
                found += self._level(held)
        elif abs(z) > self.settings.outlier_z and abs(z) * scale >= self.settings.outlier_min_effect * abs(median):
            self.held = point
            return found
        return found + self._level(point)

    def _scale(self) -> tuple[float, float]:
        return _robust([p.value for p in self.regime], self.settings.scale_floor)

    def _level(self, point: Point) -> list[ev.Detection]:
        if len(self.regime) < self.settings.warmup:  # a regime that just restarted
            self.regime.append(point)
            return []
        median, scale = self._scale()
        self.regime.append(point)
        self.detector.update(max(-self.settings.clip, min(self.settings.clip, (point.value - median) / scale)))
        if not self.detector.drift_detected:
            return []
        return self._shift(scale)

    def _shift(self, scale: float) -> list[ev.Detection]:
        points = list(self.regime)
        values = [p.value for p in points]
        at, _ = _split([v / scale for v in values])
        before, after = statistics.median(values[:at]), statistics.median(values[at:])
        z = (after - before) / scale * math.sqrt(at * (len(values) - at) / len(values))
        size = (after - before) / abs(before) if before else math.inf
        worse = after > before if self.better == "lower" else after < before
        self.detector = _page_hinkley(self.settings.delta, self.settings.threshold)
        if not math.isfinite(size) or abs(size) < self.settings.min_effect:
            return []  # too small to matter: watch on, over the same regime
        # A new regime starts at the change: the points since the change are its first points (back
        # in warm-up if there are too few to standardize by).
        self.regime = deque(points[at:], maxlen=self.settings.window)
        if not worse:
            return []
        # The result that completed the detection triggers it, so the run whose result told us is
        # the run that "brought" the regression (a held value may be the regime's last point).
        current = self.current
        assert current is not None  # set by observe, which alone gets here
        since = points[at:] + ([current] if current is not points[-1] else [])
        return self._event(
            ev.RegressionDetected, "regression", current, size, z, self.settings.shift_detector, since,
            before=before, after=after, change_run_id=since[0].run_id,
        )

    def _anomaly(self, point: Point, expected: float, z: float) -> list[ev.Detection]:
        size = (point.value - expected) / abs(expected) if expected else math.copysign(1.0, z)
        worse = point.value > expected if self.better == "lower" else point.value < expected
        return self._event(
            ev.AnomalyDetected, "anomaly", point, size, z, self.settings.outlier_detector, [point],
            value=point.value, expected=expected, direction="worse" if worse else "better",
        )


class FailureSeries(_Series):
    """One test's failures on one kind of hardware: 1 for failed or error, 0 for passed. `size` is
    the absolute change of the failure rate (a rate from 0 has no relative change)."""

    def __init__(self, key: SeriesKey, settings: Settings) -> None:
        super().__init__(key, settings, "lower")
        self.detector = self._fresh()

    def _fresh(self) -> drift.PageHinkley:
        s = self.settings
        return _page_hinkley(s.failure_delta, s.failure_threshold, mode="up", warmup=s.failure_warmup)

    def observe(self, point: Point) -> list[ev.Detection]:
        self.regime.append(point)
        self.detector.update(point.value)
        if not self.detector.drift_detected:
            return []
        points = list(self.regime)
        values = [p.value for p in points]
        at, z = _split(values)
        before, after = sum(values[:at]) / at, sum(values[at:]) / (len(values) - at)
        self.regime = deque(points[at:], maxlen=self.settings.window)
        self.detector = self._fresh()
        if after <= before:
            return []
        since = points[at:]
        # z assumed unit variance; a 0/1 series has at most 0.5.
        return self._event(
            ev.RegressionDetected, "regression", points[-1], after - before, 2 * z,
            self.settings.failure_detector, since, before=round(before, 6), after=round(after, 6),
            change_run_id=since[0].run_id,
        )


TEST_METRIC = "failure_rate"
METRIC_OUTCOMES = ("passed",)
"""A benchmark's metrics count only when it passed: a failed or broken run's numbers are no level."""
TEST_OUTCOMES = ("passed", "failed")
"""Results whose tests ran (error and timed_out are infrastructure trouble, retried elsewhere)."""


def points(
    result: ev.ResultReported, benchmark: str, hardware: list[str], tests: list[ev.TestOutcome],
    owner: str = "",
) -> Iterator[tuple[SeriesKey, bool, Point]]:
    """Every (series, is a test's failures, observation) one counted result brings: `benchmark`
    names the task (its spec name), `hardware` is its worker's, `tests` its test list (inline or
    fetched from `tests_ref`), `owner` the submitter of its run (its task's)."""
    labels = tuple(sorted(result.labels.items()))
    kinds = tuple(sorted(hardware))

    def point(value: float) -> Point:
        return Point(value, result.id, result.run_id, result.task_id, result.time)

    if result.outcome in METRIC_OUTCOMES:
        for metric, value in sorted(result.metrics.items()):
            yield SeriesKey(benchmark, metric, labels, kinds, owner), False, point(float(value))
    if result.outcome in TEST_OUTCOMES:
        for test in tests:
            if test.outcome != "skipped":
                failed = 1.0 if test.outcome in ("failed", "error") else 0.0
                yield SeriesKey(test.nodeid, TEST_METRIC, labels, kinds, owner), True, point(failed)


class Detector:
    """Every series' detectors. Feed it counted results in log order with `observe`."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.series: dict[SeriesKey, MetricSeries | FailureSeries] = {}

    def observe(
        self, result: ev.ResultReported, benchmark: str, hardware: list[str], tests: list[ev.TestOutcome],
        owner: str = "",
    ) -> list[ev.Detection]:
        """The detections this result brings (arguments as for `points`)."""
        found: list[ev.Detection] = []
        for key, failures, point in points(result, benchmark, hardware, tests, owner):
            series = self.series.get(key)
            if series is None:
                kind = FailureSeries if failures else MetricSeries
                series = self.series[key] = kind(key, self.settings)
            found += series.observe(point)
        return found
