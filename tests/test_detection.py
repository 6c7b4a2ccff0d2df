"""Online detection as pure functions: level shifts become one RegressionDetected for the worse,
single outliers one AnomalyDetected, a test that starts failing a failure-rate regression; the same
input always gives the same events, and no float (NaN, inf) can crash it."""

import math
import random
from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf import subjects
from dtf.projections.detection import Detector, Settings, better_for
from dtf.projections.detector import Follower
from dtf.spec import TaskSpec
from dtf.streams import topology
from dtf.streams.bus import StoredMsg
from test_detector_service import benchmark_runs, jump_at_20

T0 = datetime(2025, 3, 1, tzinfo=UTC)
SOME = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def result(n: int, metrics: dict[str, float] | None = None, tests=(), outcome="passed") -> ev.ResultReported:
    return ev.ResultReported(
        id=f"res{n}", time=T0 + timedelta(hours=n), run_id=f"run{n}", task_id=f"task{n}", attempt=1,
        worker_id="w1", outcome=outcome, metrics=metrics or {}, labels={"model": "bert"},
        tests=[ev.TestOutcome(nodeid=nodeid, outcome=status) for nodeid, status in tests],
    )


def detect(values, metric="latency_ms", detector=None) -> list[tuple[int, ev.Detection]]:
    """(run index, detection) for one series of values."""
    detector = detector or Detector()
    return [(n, d) for n, value in enumerate(values)
            for d in detector.observe(result(n, {metric: value}), "bench", ["cuda", "cpu"], [])]


def noisy(runs: int, seed: int, noise: float = 0.02, level: float = 100.0) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, noise)) for _ in range(runs)]


def step(values: list[float], at: int, factor: float) -> list[float]:
    return [v * factor if n >= at else v for n, v in enumerate(values)]


def test_a_20_percent_slowdown_is_one_regression_within_ten_runs_for_every_noise_level():
    for noise in (0.005, 0.01, 0.02, 0.04):
        for seed in range(5):
            found = detect(step(noisy(40, seed, noise), 20, 1.2))
            regressions = [(n, d) for n, d in found if isinstance(d, ev.RegressionDetected)]
            assert len(regressions) == 1, (noise, seed, found)
            [(n, regression)] = regressions
            assert 20 < n < 30 and regression.change_run_id == "run20", (noise, seed, n)
            assert regression.before < regression.after and 0.15 < regression.size < 0.25
            # The result that completed the detection triggers it (even when the one before was held
            # back as a possible outlier until this one said "shift"): its run brought the regression.
            assert regression.result_ids[0] == "res20" and regression.result_ids[-1] == f"res{n}"
            assert (regression.run_id, regression.task_id) == (f"run{n}", f"task{n}")


def test_the_regression_names_its_series_and_takes_its_id_and_time_from_the_triggering_result():
    [(n, regression)] = detect(step(noisy(30, 1), 20, 1.2))
    assert regression.series == "bench:latency_ms{model=bert}@cpu+cuda"
    assert regression.hardware == ["cpu", "cuda"] and regression.labels == {"model": "bert"}
    assert regression.id.startswith("regression-") and regression.id.endswith(f"-res{n}")
    assert regression.time == T0 + timedelta(hours=n)
    assert regression.better == "lower" and 0.99 < regression.confidence <= 1.0


def test_a_slowdown_is_a_regression_for_times_and_a_speedup_is_not():
    assert detect(step(noisy(40, 2), 20, 1 / 1.2)) == []
    assert [type(d) for _, d in detect(step(noisy(40, 2), 20, 1.2))] == [ev.RegressionDetected]


def test_for_throughput_less_is_the_regression():
    assert [type(d) for _, d in detect(step(noisy(40, 3), 20, 0.8), "samples_per_s")] == [ev.RegressionDetected]
    assert detect(step(noisy(40, 3), 20, 1.2), "samples_per_s") == []


def test_direction_follows_the_metric_name_and_can_be_overridden():
    assert [better_for(m) for m in ("latency_ms", "duration_s", "rss_mb", "p95_time")] == ["lower"] * 4
    assert [better_for(m) for m in ("throughput", "tokens/s", "samples_per_s", "accuracy")] == ["higher"] * 4
    assert better_for("latency_ms", {"latency_ms": "higher"}) == "higher"
    overridden = Detector(Settings(better={"latency_ms": "higher"}))
    assert detect(step(noisy(40, 2), 20, 1.2), detector=overridden) == []


def test_a_shift_smaller_than_the_minimum_effect_is_not_reported():
    assert detect(step(noisy(60, 4, noise=0.002), 20, 1.02)) == []


def test_stationary_noise_raises_no_regression_in_almost_every_series():
    alarmed = sum(any(isinstance(d, ev.RegressionDetected) for _, d in detect(noisy(60, seed, 0.03)))
                  for seed in range(50))
    assert alarmed <= 2


def test_a_single_outlier_is_one_anomaly_and_no_regression():
    values = noisy(40, 5)
    values[25] *= 1.6
    [(n, anomaly)] = detect(values)
    assert isinstance(anomaly, ev.AnomalyDetected)
    assert n == 26  # confirmed by the next run being back in line
    assert (anomaly.run_id, anomaly.result_ids, anomaly.direction) == ("run25", ["res25"], "worse")
    assert anomaly.value == values[25] and 0.5 < anomaly.size < 0.7
    assert abs(anomaly.expected - 100) < 3


def test_an_outlier_for_the_better_is_an_anomaly_too():
    values = noisy(40, 6)
    values[25] *= 0.4
    [(_, anomaly)] = detect(values)
    assert isinstance(anomaly, ev.AnomalyDetected) and anomaly.direction == "better"


def test_a_step_that_starts_far_out_is_a_regression_not_an_anomaly():
    found = detect(step(noisy(40, 7, noise=0.005), 20, 1.5))
    assert [type(d) for _, d in found] == [ev.RegressionDetected]


def test_a_test_that_starts_failing_is_a_failure_rate_regression():
    detector = Detector()
    found = []
    for n in range(30):
        outcome = "failed" if n >= 15 else "passed"
        tests = [("tests/test_a.py::test_x", outcome), ("tests/test_a.py::test_ok", "passed"),
                 ("tests/test_a.py::test_skip", "skipped")]
        found += [(n, d) for d in detector.observe(result(n, tests=tests, outcome=outcome), "unit", ["cpu"],
                                                    result(n, tests=tests).tests)]
    [(n, regression)] = found
    assert regression.series == "tests/test_a.py::test_x:failure_rate{model=bert}@cpu"
    assert (regression.before, regression.after, regression.change_run_id) == (0.0, 1.0, "run15")
    assert 15 < n <= 20


def test_an_occasional_flake_is_not_a_failure_rate_regression():
    detector, rng, found = Detector(), random.Random(8), []
    for n in range(60):
        tests = [("tests/test_a.py::test_flaky", "failed" if rng.random() < 0.1 else "passed")]
        found += detector.observe(result(n, tests=tests), "unit", ["cpu"], result(n, tests=tests).tests)
    assert found == []


def test_only_passed_results_bring_metrics_and_errored_ones_bring_no_tests():
    detector = Detector()
    values = step(noisy(40, 9), 20, 1.3)
    found = [d for n, v in enumerate(values)
             for d in detector.observe(result(n, {"latency_ms": v}, outcome="failed" if n >= 20 else "passed"),
                                       "bench", ["cpu"], [])]
    assert found == []
    errored = result(1, tests=[("t::x", "failed")], outcome="error")
    assert detector.observe(errored, "unit", ["cpu"], errored.tests) == []


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
series_values = st.lists(st.one_of(finite_or_not, st.floats(90, 130)), max_size=80)


@SOME
@given(series_values)
def test_no_float_crashes_the_detector_and_none_becomes_a_non_finite_number(values):
    for _, detection in detect(values) + detect(values, "throughput"):
        numbers = [detection.size, detection.confidence]
        numbers += ([detection.before, detection.after] if isinstance(detection, ev.RegressionDetected)
                    else [detection.value, detection.expected])
        assert all(math.isfinite(x) for x in numbers), detection
        ev.decode(ev.encode(detection))  # and it goes on the wire


@SOME
@given(st.lists(st.floats(50, 200), max_size=80), st.integers(0, 79), st.floats(0.5, 2.0))
def test_the_same_values_always_give_the_same_detections(values, at, factor):
    shifted = step(values, at, factor)
    first, second = detect(shifted), detect(shifted)
    assert [(n, msgspec.json.encode(d)) for n, d in first] == [(n, msgspec.json.encode(d)) for n, d in second]


# --- the service's pure half: which results count, what is due ------------------------------------

def stored(events: list[ev.Event]) -> list[StoredMsg]:
    return [StoredMsg(topology.EVENTS, seq, subjects.subject_for(e), ev.encode(e)) for seq, e in enumerate(events, 1)]


def follow(messages: list[StoredMsg], cuts=()) -> Follower:
    follower, start = Follower(), 0
    for end in [*sorted(set(cuts)), len(messages)]:
        follower.apply(messages[start:end], {})
        start = max(start, end)
    return follower


@SOME
@given(st.lists(st.integers(0, 91), max_size=6))
def test_batch_boundaries_do_not_change_what_the_follower_finds(cuts):
    messages = stored(benchmark_runs(jump_at_20()))
    assert list(follow(messages, cuts).due) == list(follow(messages).due)


def test_a_log_that_holds_its_detections_leaves_nothing_due():
    events = benchmark_runs(jump_at_20())
    [regression] = follow(stored(events)).due.values()
    assert follow(stored([*events, regression])).due == {}


def test_a_detection_on_a_subject_that_is_not_the_detectors_does_not_count_as_published():
    events = benchmark_runs(jump_at_20())
    [regression] = follow(stored(events)).due.values()
    forged = StoredMsg(topology.EVENTS, len(events) + 1,
                       subjects.task(regression.run_id, regression.task_id, "regression", "mallory"),
                       ev.encode(regression))
    assert list(follow([*stored(events), forged]).due) == [regression.id]


def test_only_the_current_attempts_result_from_its_worker_counts():
    events = benchmark_runs(jump_at_20())
    late = [msgspec.structs.replace(e, id=f"{e.id}-forged", worker_id="w2", metrics={"latency_ms": 1e6})
            for e in events if isinstance(e, ev.ResultReported)]
    assert list(follow(stored(events + late)).due) == list(follow(stored(events)).due)


def test_a_test_list_kept_in_the_artifacts_store_counts_like_an_inline_one():
    spec = TaskSpec(type="test", name="unit", config={"paths": ["tests"]})
    events: list[ev.Event] = [ev.WorkerRegistered(id="w1-registered", time=T0, worker_id="w1", host="h", pid=1)]
    lists = {}
    for n in range(20):
        run, task, at = f"run{n}", f"unit-{n}", T0 + timedelta(hours=n)
        outcome = "failed" if n >= 10 else "passed"
        lists[("w1", f"results/{task}/1.json")] = [ev.TestOutcome(nodeid="tests/test_a.py::test_x", outcome=outcome)]
        events += [
            ev.TaskSubmitted(id=f"{task}-s", time=at, run_id=run, task_id=task, submitter="ci", spec=spec),
            ev.TaskAssigned(id=f"{task}-a", time=at, run_id=run, task_id=task, attempt=1, worker_id="w1",
                            coordinator="c1", spec=spec),
            ev.ResultReported(id=f"{task}-r", time=at, run_id=run, task_id=task, attempt=1, worker_id="w1",
                              outcome=outcome, tests_ref=f"results/{task}/1.json"),
        ]
    follower = Follower()
    follower.apply(stored(events), lists)
    [regression] = follower.due.values()
    assert regression.series == "tests/test_a.py::test_x:failure_rate@cpu"
    assert (regression.change_run_id, regression.before, regression.after) == ("run10", 0.0, 1.0)
    assert Follower().results.apply(stored(events)[-1], {})[1] is None  # a result alone counts for nothing
